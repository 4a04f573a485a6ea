//! `openlora bench --device cpu`: the CPU serving path, in-process, on a model of the shape the
//! Hugging Face PEFT baseline (`bench/hf_peft_baseline.py`) serves — batch-16 and batch-1
//! throughput with mixed adapters and without, then the S-LoRA workload (Zipf popularity over N
//! adapters, Poisson arrivals) at each request rate. The model and adapter folders it writes
//! can be kept (`keep`) so that the baseline reads the very same weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use super::random::{self, QKVO, RandomAdapter};
use super::serving::modes;
use super::slora::{self, Driver, Slo};
use super::workload::WorkloadSpec;
use crate::engine::{EngineConfig, EngineHandle};
use crate::error::{Error, LoadError, Result};
use crate::metrics::Metrics;
use crate::model::{KvDType, LoadedModel, ServeDType};
use crate::pager::{AdapterPager, PagerConfig, PoolPlace};

/// `config.json` of the benchmark's model: a 184M-parameter Llama (hidden 1024, 8 layers,
/// 16 heads, vocab 32,000, untied head), f32 weights.
pub const BENCH_MODEL_CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 1024, "intermediate_size": 3456,
    "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
    "torch_dtype": "float32", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2}"#;

/// What the CPU benchmark runs.
#[derive(Clone)]
pub struct CpuBenchConfig {
    /// A model folder to serve; `None`: a random one of [`BENCH_MODEL_CONFIG`]'s shape.
    pub model: Option<PathBuf>,
    /// The repository's `tests/fixtures` (the random model's tokenizer).
    pub fixtures: PathBuf,
    /// The dtype to serve in.
    pub dtype: ServeDType,
    /// What the KV cache keeps keys and values in.
    pub kv_cache_dtype: KvDType,
    /// Batch sizes of the fixed-batch runs.
    pub batches: Vec<usize>,
    /// Adapter rank.
    pub rank: usize,
    /// Prompt tokens in the fixed-batch runs.
    pub prompt: usize,
    /// New tokens in the fixed-batch runs.
    pub new_tokens: usize,
    /// The S-LoRA workload (its `rate` replaced by each of `rates`); `None` skips it.
    pub workload: Option<WorkloadSpec>,
    /// Request rates (per second) to run the workload at.
    pub rates: Vec<f64>,
    /// A request meets its SLO when its time to first token and time per output token are
    /// within these.
    pub slo_ttft: Duration,
    /// See `slo_ttft`.
    pub slo_tpot: Duration,
    /// Where to write the model and adapters (kept); `None`: a temporary folder, removed.
    pub keep: Option<PathBuf>,
    /// Called once per finished workload request (a progress bar).
    pub progress: Option<Arc<dyn Fn(u64) + Send + Sync>>,
}

/// Runs the benchmark; the report as JSON (figures recomputable from its per-request rows).
pub fn run(c: &CpuBenchConfig) -> Result<Value> {
    let root = c
        .keep
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("openlora-cpu-bench-{}", std::process::id())));
    let model_dir = match &c.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = root.join("model");
            if !dir.join("model.safetensors").exists() {
                write_random_model(&dir, BENCH_MODEL_CONFIG, &c.fixtures, 7)?;
            }
            dir
        }
    };
    let t = Instant::now();
    let model = Arc::new(LoadedModel::load_as(&model_dir, c.dtype)?);
    let load_s = t.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    let adapters = c.workload.as_ref().map_or(0, |w| w.adapters).max(c.batches.iter().copied().max().unwrap_or(1));
    let mut names = Vec::with_capacity(adapters);
    for i in 0..adapters {
        let dir = root.join("adapters").join(format!("a{i}"));
        if !dir.join(crate::adapters::WEIGHTS_FILE).exists() {
            let spec =
                RandomAdapter { rank: c.rank, targets: &QKVO, scale: 1.0, seed: i as u64 + 1, dtype: DType::F32 };
            random::write(&dir, &cfg, &spec)?;
        }
        names.push((format!("a{i}"), dir));
    }
    let metrics = Metrics::new();
    // Every adapter fits in the host cache; the active pool holds 48 (three batches of 16),
    // so a Zipf workload over many adapters pages them in and out as it would in production.
    // (The host cache holds f32 weights; the pool holds bf16 values when serving in bf16.)
    let adapter_values = cfg.num_layers * QKVO.len() * 2 * c.rank * cfg.hidden_size;
    let pool = PoolPlace::for_backend(false, model.serves_bf16());
    let pager_config = PagerConfig {
        host_cache_bytes: (adapters + 1) * adapter_values * 4,
        active_pool_bytes: 48 * adapter_values * pool.value_bytes(),
        pool,
        ..PagerConfig::default()
    };
    let pager = AdapterPager::new(&cfg, pager_config, metrics.pager.clone());
    for (name, dir) in &names {
        pager.register(name, dir)?;
    }
    let engine_config = EngineConfig { kv_cache_dtype: c.kv_cache_dtype, ..EngineConfig::default() };
    let engine = EngineHandle::start(model.clone(), pager, engine_config, metrics.clone())?;
    let names: Vec<String> = names.into_iter().map(|(n, _)| n).collect();
    let mut batches = serde_json::Map::new();
    for &b in &c.batches {
        // The best of three runs of each mode: the machine's noise only ever slows a run.
        let runs = (0..3)
            .map(|_| modes(&engine, &names[..b.min(names.len())], b, c.prompt, c.new_tokens))
            .collect::<Result<Vec<_>>>()?;
        batches.insert(b.to_string(), best_of(&runs));
    }
    let mut workload = Vec::new();
    if let Some(spec) = &c.workload {
        for &rate in &c.rates {
            let spec = WorkloadSpec { rate, ..spec.clone() };
            let slo = Slo { ttft: c.slo_ttft, tpot: c.slo_tpot };
            let driver = Driver::Engine { engine: &engine, metrics: &metrics };
            workload.push(slora::run(&driver, &names, &spec, slo, c.progress.as_deref())?);
        }
    }
    if c.keep.is_none() {
        std::fs::remove_dir_all(&root).ok();
    }
    Ok(json!({
        "device": "cpu",
        "isa": openlora_kernels::gemm::isa_name(),
        "threads": openlora_kernels::gemm::threads(),
        "dtype": model.llama()?.dtype().as_str(),
        "kv_cache_dtype": c.kv_cache_dtype.as_str(),
        "model": {"hidden": cfg.hidden_size, "layers": cfg.num_layers, "vocab": cfg.vocab_size,
                  "intermediate": cfg.intermediate_size, "load_s": load_s},
        "rank": c.rank, "prompt": c.prompt, "new_tokens": c.new_tokens,
        "batches": batches,
        "workload": workload,
    }))
}

/// Of several [`modes`] runs, each mode's fastest, and the mixed/base ratio of those; every
/// run's figures are kept under `runs`.
fn best_of(runs: &[Value]) -> Value {
    let best = |mode: &str| {
        runs.iter().map(|r| r[mode].clone()).max_by(|a, b| {
            let t = |v: &Value| v["tok_per_s"].as_f64().unwrap_or(0.0);
            t(a).total_cmp(&t(b))
        })
    };
    let (base, mixed) = (best("base").unwrap_or_default(), best("mixed").unwrap_or_default());
    let ratio = mixed["seconds"].as_f64().unwrap_or(0.0) / base["seconds"].as_f64().unwrap_or(1.0);
    json!({"base": base, "mixed": mixed, "mixed_over_base": ratio, "runs": runs})
}

/// Writes a model folder for `cfg_text` with seeded random f32 weights (scaled as a trained
/// model's) and the fixture model's tokenizer.
pub fn write_random_model(dir: &Path, cfg_text: &str, fixtures: &Path, seed: u64) -> Result<()> {
    super::serving::weightless_model(dir, cfg_text, fixtures)?;
    let cfg = crate::model::ModelConfig::from_file(&dir.join("config.json"))?;
    use rand::{Rng, SeedableRng};
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Uniform with a trained layer's variance, 1 / fan-in, from the seed.
    let mut randn = |rows: usize, cols: usize| {
        let bound = (3.0 / cols as f32).sqrt();
        Tensor::from_vec(
            (0..rows * cols).map(|_| rng.random_range(-bound..bound)).collect::<Vec<f32>>(),
            (rows, cols),
            &dev,
        )
    };
    let h = cfg.hidden_size;
    let mut tensors = std::collections::HashMap::new();
    tensors.insert("model.embed_tokens.weight".to_string(), randn(cfg.vocab_size, h)?);
    tensors.insert("lm_head.weight".to_string(), randn(cfg.vocab_size, h)?);
    tensors.insert("model.norm.weight".to_string(), Tensor::ones(h, DType::F32, &dev)?);
    for l in 0..cfg.num_layers {
        for p in crate::model::Proj::ALL {
            let (o, i) = p.shape(&cfg);
            tensors.insert(p.tensor_name(l), randn(o, i)?);
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.insert(format!("model.layers.{l}.{norm}.weight"), Tensor::ones(h, DType::F32, &dev)?);
        }
    }
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)
        .map_err(|e| Error::from(LoadError::WeightFile { file: path.clone(), message: e.to_string() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::workload::LengthRange;

    /// The whole benchmark on a narrow model: every section present and consistent.
    #[test]
    fn the_cpu_bench_reports_every_section() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let keep = std::env::temp_dir().join(format!("openlora-cpu-bench-test-{}", std::process::id()));
        let tiny = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": false}"#;
        write_random_model(&keep.join("model"), tiny, &fixtures, 1).expect("model");
        let len = |n: usize| LengthRange { lo: n, hi: n };
        let c = CpuBenchConfig {
            model: Some(keep.join("model")),
            fixtures,
            dtype: ServeDType::Bf16,
            kv_cache_dtype: KvDType::Bf16,
            batches: vec![4, 1],
            rank: 4,
            prompt: 8,
            new_tokens: 3,
            workload: Some(WorkloadSpec {
                adapters: 6,
                zipf_exponent: 1.0,
                rate: 0.0,
                requests: 12,
                prompt: LengthRange { lo: 4, hi: 9 },
                output: len(3),
                seed: 5,
            }),
            rates: vec![200.0],
            slo_ttft: Duration::from_secs(60),
            slo_tpot: Duration::from_secs(60),
            keep: Some(keep.clone()),
            progress: None,
        };
        let r = run(&c).expect("bench");
        assert_eq!(r["dtype"], "bf16");
        assert_eq!(r["kv_cache_dtype"], "bf16");
        assert_eq!(r["batches"]["4"]["mixed"]["tokens"], 12);
        assert_eq!(r["batches"]["1"]["base"]["tokens"], 3);
        let w = &r["workload"][0];
        assert_eq!(w["requests"], 12);
        assert_eq!(w["per_request"].as_array().map(Vec::len), Some(12));
        assert_eq!(w["slo"]["attainment"], 1.0);
        assert!(w["adapter_cache"]["hit_rate"].as_f64().is_some_and(|h| (0.0..=1.0).contains(&h)));
        assert!(w["ttft_s"]["p99"].as_f64() >= w["ttft_s"]["p50"].as_f64());
        std::fs::remove_dir_all(&keep).ok();
    }
}
