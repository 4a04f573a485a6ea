//! `openlora bench`: the GPU check (parity, then throughput at Llama-7B shape) and the CPU
//! benchmark (fixed batches and the S-LoRA workload), and `--compare` beside HF PEFT.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
    /// The device: a GPU (cuda:N) or cpu.
    #[arg(long, default_value = "cuda:0")]
    device: openlora::device::DeviceSpec,
    #[command(flatten)]
    cpu: CpuBenchArgs,
    /// The repository's tests/fixtures, for the parity checks; "none" skips them.
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
    /// Distinct adapters in the mixed batch.
    #[arg(long, default_value_t = 32)]
    adapters: usize,
    /// Their rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Sequences per batch (GPU; the CPU runs --batches).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Prompt tokens (default: 128 on a GPU, 32 on the CPU).
    #[arg(long)]
    prompt: Option<usize>,
    /// New tokens (default: 128 on a GPU, 32 on the CPU).
    #[arg(long)]
    new_tokens: Option<usize>,
    /// Registered adapters for the power-law popularity run (0 skips it).
    #[arg(long, default_value_t = 1000)]
    registered: usize,
    /// Also write the report (JSON) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only the parity checks on the fixtures; exit 1 if one fails.
    #[arg(long)]
    parity_only: bool,
}

/// `openlora bench --device cpu`'s own options (the S-LoRA workload and the model).
#[derive(Args)]
struct CpuBenchArgs {
    /// A model folder to serve; default: a random 184M-parameter Llama (hidden 1024, 8 layers,
    /// vocab 32,000, f32), the PEFT baseline's.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The dtype to serve in: auto (as stored), bf16, f16, f32 or int8 (weight-only).
    #[arg(long, default_value = "auto")]
    dtype: openlora::model::ServeDType,
    /// What the KV cache keeps keys and values in: f32 or bf16 (as `memory.kv_cache_dtype`).
    #[arg(long, default_value = "f32")]
    kv_cache_dtype: openlora::model::KvDType,
    /// Batch sizes of the fixed-batch runs (base, then one adapter per request).
    #[arg(long, value_delimiter = ',', default_value = "16,1")]
    batches: Vec<usize>,
    /// Distinct adapters of the S-LoRA workload (0 skips it).
    #[arg(long, default_value_t = 100)]
    workload_adapters: usize,
    /// Zipf exponent of adapter popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Request rates (per second) to run the workload at, Poisson arrivals.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    rates: Vec<f64>,
    /// Requests per rate.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Prompt tokens of workload requests: N or LO-HI (uniform).
    #[arg(long, default_value = "16-48")]
    prompt_len: openlora::harness::workload::LengthRange,
    /// New tokens of workload requests: N or LO-HI (uniform).
    #[arg(long, default_value = "16-48")]
    output_len: openlora::harness::workload::LengthRange,
    /// Seed of the request sequence (the same seed, the same requests).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// SLO on time to first token, milliseconds.
    #[arg(long, default_value_t = 2000)]
    slo_ttft_ms: u64,
    /// SLO on time per output token, milliseconds.
    #[arg(long, default_value_t = 200)]
    slo_tpot_ms: u64,
    /// Keep the model and adapter folders here (for `bench/hf_peft_baseline.py` to read).
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Write the throughput/latency chart here (SVG).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Run nothing: set this earlier report beside --baseline's (`bench/hf_peft_baseline.py`)
    /// and print the comparison tables (markdown); --svg charts both.
    #[arg(long, requires = "baseline")]
    compare: Option<PathBuf>,
    /// The HF PEFT baseline's report, for --compare.
    #[arg(long, requires = "compare")]
    baseline: Option<PathBuf>,
    /// Drive a running server (http://host:port) instead of an engine in this process: the
    /// S-LoRA workload over its adapters (those `/v1/models` lists with a parent), streamed
    /// through `/v1/completions`.
    #[arg(long)]
    url: Option<String>,
    /// Bearer key for --url.
    #[arg(long)]
    api_key: Option<String>,
    /// Token ids of --url prompts are drawn below this (any served vocabulary is larger).
    #[arg(long, default_value_t = 1000)]
    vocab: usize,
}

/// `openlora bench --url`: the S-LoRA workload against a running server.
fn run_url_bench(
    url: &str,
    a: &CpuBenchArgs,
    out: Option<&std::path::Path>,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<bool> {
    use openlora::harness::http_client::Endpoint;
    use openlora::harness::slora::{self, Driver, Slo};
    use openlora::harness::workload::WorkloadSpec;
    let endpoint = Endpoint::parse(url, a.api_key.clone())?;
    let mut names: Vec<String> = endpoint.models()?.into_iter().filter_map(|(id, parent)| parent.map(|_| id)).collect();
    names.sort();
    anyhow::ensure!(!names.is_empty(), "{url} serves no adapters (no /v1/models item has a parent)");
    anyhow::ensure!(a.vocab > 1, "--vocab: at least 2");
    let driver = Driver::Http { endpoint: &endpoint, vocab: a.vocab };
    let slo = Slo { ttft: Duration::from_millis(a.slo_ttft_ms), tpot: Duration::from_millis(a.slo_tpot_ms) };
    let tick = |n| bar.inc(n);
    let mut runs = Vec::new();
    for &rate in &a.rates {
        let spec = WorkloadSpec {
            adapters: a.workload_adapters.clamp(1, names.len()),
            zipf_exponent: a.zipf,
            rate,
            requests: a.requests,
            prompt: a.prompt_len,
            output: a.output_len,
            seed: a.seed,
        };
        runs.push(slora::run(&driver, &names, &spec, slo, Some(&tick))?);
    }
    bar.finish_and_clear();
    let report = serde_json::json!({"url": url, "adapters": names.len(), "workload": runs});
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(out) = out {
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    }
    if let Some(svg) = &a.svg {
        write_chart(svg, &report)?;
    }
    Ok(true)
}

/// The workload's chart of one report.
fn write_chart(svg: &std::path::Path, report: &serde_json::Value) -> anyhow::Result<()> {
    use openlora::harness::chart;
    let points = report["workload"]
        .as_array()
        .map(|runs| {
            runs.iter()
                .filter_map(|r| {
                    Some((r["spec"]["rate"].as_f64()?, r["tok_per_s"].as_f64()?, r["ttft_s"]["p99"].as_f64()?))
                })
                .collect()
        })
        .unwrap_or_default();
    chart::write_svg(svg, &[chart::Series { name: "openlora", points }])?;
    Ok(())
}

/// `openlora bench --compare OURS --baseline PEFT`: the tables, and the chart of both.
fn run_bench_compare(
    ours: &std::path::Path,
    peft: &std::path::Path,
    svg: Option<&std::path::Path>,
) -> anyhow::Result<bool> {
    use openlora::harness::{chart, compare};
    let read = |p: &std::path::Path| -> anyhow::Result<serde_json::Value> {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a bench report", p.display()))
    };
    let (ours, peft) = (read(ours)?, read(peft)?);
    println!("{}", compare::markdown(&ours, &peft));
    if let Some(svg) = svg {
        chart::write_svg(svg, &compare::as_chart(&compare::series(&ours, &peft)))?;
    }
    Ok(true)
}

/// `openlora bench --device cpu`: prints (and writes) the report.
fn run_cpu_bench(args: BenchArgs) -> anyhow::Result<bool> {
    use openlora::harness::{cpu_bench, workload::WorkloadSpec};
    let a = args.cpu;
    if let (Some(ours), Some(peft)) = (&a.compare, &a.baseline) {
        return run_bench_compare(ours, peft, a.svg.as_deref());
    }
    anyhow::ensure!(a.batches.iter().all(|&b| b > 0), "--batches: every batch size must be at least 1");
    anyhow::ensure!(a.rates.iter().all(|&r| r > 0.0 && r.is_finite()), "--rates: rates must be positive");
    let workload = (a.workload_adapters > 0 && a.requests > 0).then(|| WorkloadSpec {
        adapters: a.workload_adapters,
        zipf_exponent: a.zipf,
        rate: 0.0,
        requests: a.requests,
        prompt: a.prompt_len,
        output: a.output_len,
        seed: a.seed,
    });
    let total = if workload.is_some() || a.url.is_some() { (a.requests * a.rates.len()) as u64 } else { 0 };
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} requests ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("S-LoRA workload");
    if let Some(url) = &a.url {
        return run_url_bench(url, &a, args.out.as_deref(), &bar);
    }
    let tick = bar.clone();
    let c = cpu_bench::CpuBenchConfig {
        model: a.model,
        fixtures: args.fixtures,
        dtype: a.dtype,
        kv_cache_dtype: a.kv_cache_dtype,
        batches: a.batches,
        rank: args.rank,
        prompt: args.prompt.unwrap_or(32).max(1),
        new_tokens: args.new_tokens.unwrap_or(32).max(1),
        workload,
        rates: a.rates,
        slo_ttft: Duration::from_millis(a.slo_ttft_ms),
        slo_tpot: Duration::from_millis(a.slo_tpot_ms),
        keep: a.keep,
        progress: Some(Arc::new(move |n| tick.inc(n))),
    };
    let report = cpu_bench::run(&c)?;
    bar.finish_and_clear();
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    }
    if let Some(svg) = &a.svg {
        write_chart(svg, &report)?;
    }
    Ok(true)
}

/// Runs a benchmark; `Ok(false)` when a GPU parity check failed.
pub fn run_bench(args: BenchArgs) -> anyhow::Result<bool> {
    // A running server (--url) or two reports (--compare) need no device here.
    let elsewhere = args.cpu.url.is_some() || args.cpu.compare.is_some();
    let openlora::device::DeviceSpec::Cuda(ordinal) = args.device else {
        return run_cpu_bench(args);
    };
    if elsewhere {
        return run_cpu_bench(args);
    }
    #[cfg(feature = "cuda")]
    {
        let c = openlora::harness::BenchConfig {
            ordinal,
            fixtures: (args.fixtures.as_os_str() != "none").then_some(args.fixtures),
            adapters: args.adapters.max(1),
            rank: args.rank,
            batch: args.batch.max(1),
            prompt: args.prompt.unwrap_or(128).max(1),
            new_tokens: args.new_tokens.unwrap_or(128).max(1),
            registered: args.registered,
            parity_only: args.parity_only,
        };
        let report = openlora::harness::bench::run(&c)?;
        let text = serde_json::to_string_pretty(&report)?;
        println!("{text}");
        if let Some(out) = &args.out {
            std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
        }
        for section in ["parity", "serving_parity"] {
            if report.get(section).is_some_and(|r| !openlora::harness::parity::passed(r)) {
                tracing::error!("the GPU's {section} check failed (see the report above)");
                return Ok(false);
            }
        }
        Ok(true)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = args;
        Err(openlora::device::probe_cuda(ordinal).map(|_| ()).unwrap_err().into())
    }
}
