//! The `openlora` command line.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

mod cli_accounts;
mod cli_bench;
mod cli_plugin;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use openlora::config::ServerConfig;
use openlora::embedded;
use openlora::engine::{EngineConfig, EngineHandle, Event, GenerationRequest};
use openlora::metrics::Metrics;
use openlora::model::LoadedModel;
use openlora::pager::{AdapterPager, PagerConfig};
use openlora::sampling::SamplingParams;
use openlora::serve::Server;

/// openlora: serve one base model with many LoRA adapters, and pay everyone fairly.
#[derive(Parser)]
#[command(name = "openlora", version, about, long_about = None)]
struct Cli {
    /// Log lines on stderr as plain text or JSON objects, one a line (default: $OPENLORA_LOG_FORMAT,
    /// else text); the level comes from RUST_LOG (default info).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object a line.
    Json,
}

/// Sends `tracing` events to stderr in `format` (else $OPENLORA_LOG_FORMAT, else text), at the
/// levels RUST_LOG allows (default info).
fn init_logging(format: Option<LogFormat>) -> anyhow::Result<()> {
    let format = match format {
        Some(f) => f,
        None => match std::env::var("OPENLORA_LOG_FORMAT").ok().as_deref().map(str::trim) {
            None | Some("") | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => anyhow::bail!("OPENLORA_LOG_FORMAT={other:?}: expected text or json"),
        },
    };
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing_subscriber::filter::LevelFilter::INFO.into())
        .from_env_lossy();
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => logs.json().with_ansi(false).try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("starting the log: {e}"))
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Serve the OpenAI-compatible HTTP API (embedded model and demo adapters by default).
    Serve(ServeArgs),
    /// Work with policy plugins (router, pricer, attributor wasm components).
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Read and verify the attribution ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Benchmarks: on a GPU, parity on the fixtures then multi-adapter throughput at Llama-7B
    /// shape; on the CPU, batch-16/batch-1 throughput and the S-LoRA workload (Zipf adapters,
    /// Poisson arrivals) on the PEFT baseline's model.
    Bench(cli_bench::BenchArgs),
    /// Make, list and revoke the API keys of owners, tenants and contributors (on the database
    /// beside the ledger, so with the server running or not).
    #[command(subcommand)]
    Keys(cli_accounts::KeysCommand),
    /// How one request's charge was computed and split, with a replay check.
    Explain(cli_accounts::ExplainArgs),
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Check the hash chain, the signed checkpoints and replay every entry's pricer and attributor;
    /// exit 1 naming the first bad entry or the checkpoint it contradicts.
    Verify(VerifyArgs),
    /// Sign the ledger's head with the server's key now and print the checkpoint (JSON), for
    /// publishing somewhere a database writer cannot reach.
    Checkpoint(LedgerArgs),
    /// Write entries as CSV (one row per split) or JSON lines (one entry per line) to stdout.
    Export(ExportArgs),
    /// Totals by payee, adapter or tenant.
    Summary(SummaryArgs),
}

/// Which ledger to read.
#[derive(Args)]
pub struct LedgerArgs {
    /// The ledger: `sqlite:<path>`, a file path, or `postgres://...`. Default: the server config's
    /// `[ledger] url`, else `ledger.sqlite3` in its data directory (`$OPENLORA_HOME`).
    #[arg(long)]
    ledger: Option<String>,
    /// The server's TOML configuration (for its ledger, data directory and plugin limits).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Which entries to read.
#[derive(Args)]
struct RangeArgs {
    /// Entries written at or after this time (Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ).
    #[arg(long)]
    since: Option<String>,
    /// Entries written before this time.
    #[arg(long)]
    until: Option<String>,
    /// Only this tenant's entries.
    #[arg(long)]
    tenant: Option<String>,
    /// Only entries served by this adapter.
    #[arg(long)]
    adapter: Option<String>,
    /// Only entries on this owner's adapters (as recorded when each was written).
    #[arg(long)]
    owner: Option<String>,
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    ledger: LedgerArgs,
    /// Check the chain only, without replaying the plugins.
    #[arg(long)]
    no_replay: bool,
    /// The public key (64 hex digits) the ledger's checkpoints must be signed with. Default: the
    /// server's signing key, when its file can be read.
    #[arg(long)]
    public_key: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    ledger: LedgerArgs,
    #[command(flatten)]
    range: RangeArgs,
    /// csv or jsonl.
    #[arg(long, default_value = "jsonl")]
    format: String,
}

#[derive(Args)]
struct SummaryArgs {
    #[command(flatten)]
    ledger: LedgerArgs,
    #[command(flatten)]
    range: RangeArgs,
    /// payee, adapter or tenant.
    #[arg(long, default_value = "payee")]
    by: String,
    /// Print the totals as JSON.
    #[arg(long)]
    json: bool,
}

impl LedgerArgs {
    /// The server configuration given (or the default one).
    fn config(&self) -> anyhow::Result<ServerConfig> {
        Ok(ServerConfig::load(self.config.as_deref())?)
    }

    /// The configuration and where its ledger is (which must exist, unless `create`).
    fn location(&self, create: bool) -> anyhow::Result<(ServerConfig, openlora::ledger::Location)> {
        let config = self.config()?;
        let location = match &self.ledger {
            Some(l) => openlora::ledger::Location::parse(l).context("--ledger")?,
            None => config.ledger.location(&data_dir(&config))?,
        };
        if let openlora::ledger::Location::Sqlite(path) = &location
            && !path.exists()
            && !create
        {
            anyhow::bail!("{}: no ledger there (give --ledger or --config)", path.display());
        }
        Ok((config, location))
    }

    fn open(&self) -> anyhow::Result<(ServerConfig, Box<dyn openlora::ledger::LedgerStore>, String)> {
        let (config, location) = self.location(false)?;
        let store = location.open().with_context(|| format!("opening the ledger {location}"))?;
        Ok((config, store, location.to_string()))
    }

    /// The accounts, keys and audit trail beside the ledger (created if need be).
    fn accounts(&self, create: bool) -> anyhow::Result<std::sync::Arc<openlora::accounts::Accounts>> {
        let (config, location) = self.location(create)?;
        let signer = config.ledger.audit_signer(&data_dir(&config));
        openlora::accounts::Accounts::open(&location, config.owners, signer)
            .with_context(|| format!("opening the accounts beside the ledger {location}"))
    }
}

/// The server's data directory.
fn data_dir(config: &ServerConfig) -> PathBuf {
    config.data_dir.clone().unwrap_or_else(embedded::data_dir)
}

impl RangeArgs {
    fn filter(&self) -> anyhow::Result<openlora::ledger::Filter> {
        use openlora::ledger::report::parse_time;
        let time = |flag: &str, v: &Option<String>| {
            v.as_deref().map(parse_time).transpose().map_err(|m| anyhow::anyhow!("--{flag}: {m}"))
        };
        Ok(openlora::ledger::Filter {
            since_ms: time("since", &self.since)?,
            until_ms: time("until", &self.until)?,
            tenant: self.tenant.clone(),
            adapter: self.adapter.clone(),
            owner: self.owner.clone(),
        })
    }
}

fn run_ledger(command: LedgerCommand) -> anyhow::Result<bool> {
    use openlora::ledger::report;
    match command {
        LedgerCommand::Verify(args) => {
            let (config, mut store, name) = args.ledger.open()?;
            let mut replayer =
                if args.no_replay { None } else { Some(openlora::policy::Replayer::new(&config.policy)?) };
            let mut trust = config.ledger.trust(&data_dir(&config));
            if let Some(hex) = &args.public_key {
                trust.key = Some(openlora::ledger::checkpoint::parse_public_key(hex).context("--public-key")?);
            }
            let r = openlora::ledger::verify::verify_with(
                store.as_mut(),
                replayer.as_mut().map(|r| r as _),
                &name,
                &trust,
            )?;
            let audit_trust = config.ledger.audit_trust(&data_dir(&config));
            let audit = args.ledger.accounts(false)?.verify_audit(&audit_trust)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({"ledger": r, "audit": audit}))?);
                return Ok(r.ok() && audit.ok());
            }
            match &audit.problem {
                None => {
                    println!("audit trail: ok: {} records, hash chain intact; head {}", audit.records, audit.head_hash)
                }
                Some(p) => println!("audit trail: FAILED: {p} ({} records before it verified)", audit.records),
            }
            if let Some(bad) = &r.first_bad {
                println!(
                    "{name}: FAILED at entry {}{}: {}",
                    bad.seq,
                    bad.request_id.as_deref().map(|id| format!(" (request {id})")).unwrap_or_default(),
                    bad.problem
                );
                println!("{} entries before it verified", r.entries);
            } else {
                println!(
                    "{name}: ok: {} entries, hash chain intact, {} settlements replayed exactly; head {}",
                    r.entries, r.replayed, r.head_hash
                );
                match (&r.checkpoints_unchecked, r.latest_checkpoint) {
                    (Some(why), _) => println!("checkpoints NOT checked: {why}"),
                    (None, Some(latest)) => {
                        println!("{} signed checkpoints hold (the latest at entry {latest})", r.checkpoints_checked)
                    }
                    (None, None) => println!("no signed checkpoint yet"),
                }
            }
            Ok(r.ok() && audit.ok())
        }
        LedgerCommand::Checkpoint(args) => {
            use openlora::ledger::checkpoint::{Checkpoint, latest_path, read_key, write_latest};
            let (config, mut store, _) = args.open()?;
            let key_path = config.ledger.signing_key_path(&data_dir(&config));
            let key = read_key(&key_path).context("the ledger's signing key")?;
            let c = Checkpoint::sign(&key, &store.head()?, openlora::ledger::now_ms());
            store.put_checkpoint(&c)?;
            write_latest(&latest_path(&key_path), &c)?;
            println!("{}", serde_json::to_string_pretty(&c)?);
            Ok(true)
        }
        LedgerCommand::Export(args) => {
            let format: report::Format = args.format.parse().map_err(|m: String| anyhow::anyhow!("--format: {m}"))?;
            let (_, mut store, _) = args.ledger.open()?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            report::export(store.as_mut(), &args.range.filter()?, format, &mut out)?;
            out.flush()?;
            Ok(true)
        }
        LedgerCommand::Summary(args) => {
            let by: report::GroupBy = args.by.parse().map_err(|m: String| anyhow::anyhow!("--by: {m}"))?;
            let (_, mut store, _) = args.ledger.open()?;
            let rows = report::summary(store.as_mut(), &args.range.filter()?, by)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(true);
            }
            println!(
                "{:<40} {:>8} {:>10} {:>20} {:>12} {:>12}",
                args.by, "currency", "requests", "micro-units", "prompt", "completion"
            );
            for r in &rows {
                println!(
                    "{:<40} {:>8} {:>10} {:>20} {:>12} {:>12}",
                    r.key, r.currency, r.requests, r.amount, r.prompt_tokens, r.completion_tokens
                );
            }
            Ok(true)
        }
    }
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Validate a plugin as an upload would and dry-run it on sample requests (or, with
    /// --from-ledger, on an adapter's recorded traffic).
    Check(CheckArgs),
    /// Create a plugin crate for one world: SDK dependency, typed config, native tests, README.
    New(cli_plugin::NewArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// The component (built for wasm32-wasip2).
    file: PathBuf,
    /// The world it must export (router, pricer, attributor); default: whichever it exports.
    #[arg(long)]
    world: Option<String>,
    /// The plugin's configuration, as JSON text.
    #[arg(long, conflicts_with = "plugin_config_file")]
    plugin_config: Option<String>,
    /// The plugin's configuration, as a JSON file.
    #[arg(long)]
    plugin_config_file: Option<PathBuf>,
    /// Samples to dry-run: a JSON file with a list of {"request", "usage", "charge"}; default: built-in samples.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// The server's TOML configuration, as everywhere else: its `[policy]` limits (default: the
    /// built-in ones), and with `--from-ledger` its ledger.
    #[arg(long, alias = "server-config")]
    config: Option<PathBuf>,
    /// Run the attributor on recorded traffic instead of samples: the latest entries of the
    /// adapter `--slot adapter:NAME` names, each with its recorded request, usage and owner's
    /// share, printing what it would have paid beside what was paid.
    #[arg(long, requires = "slot", conflicts_with = "samples")]
    from_ledger: bool,
    /// The slot the plugin is meant for: `operator` (the default: the operator's slot of its
    /// world, seeing every sample) or `adapter:NAME` (only requests on that adapter, whose charge
    /// stands for the owner's share); with --from-ledger, the adapter whose traffic to read.
    #[arg(long)]
    slot: Option<String>,
    /// The ledger to read with --from-ledger (default: the server config's).
    #[arg(long)]
    ledger: Option<String>,
    /// How many of the adapter's latest entries --from-ledger reads (at most 1000).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// With --from-ledger: entries written at or after this time (Unix seconds or dates).
    #[arg(long, requires = "from_ledger")]
    since: Option<String>,
    /// With --from-ledger: entries written before this time.
    #[arg(long, requires = "from_ledger")]
    until: Option<String>,
}

fn run_plugin_check(args: CheckArgs) -> anyhow::Result<bool> {
    use openlora::policy::check::{check, default_samples, read_samples};
    let bytes = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    if let Some(path) = &args.config
        && path.to_string_lossy().trim_start().starts_with('{')
    {
        anyhow::bail!("--config is the server's TOML file; give the plugin's JSON with --plugin-config");
    }
    let server = LedgerArgs { ledger: args.ledger.clone(), config: args.config.clone() };
    let world =
        args.world.as_deref().map(str::parse).transpose().map_err(|e: String| anyhow::anyhow!("--world: {e}"))?;
    let config = match (&args.plugin_config, &args.plugin_config_file) {
        (Some(c), _) => c.clone(),
        (None, Some(path)) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        (None, None) => String::new(),
    };
    if args.from_ledger {
        let slot = args.slot.as_deref().unwrap_or_default();
        let time = |flag: &str, v: &Option<String>| {
            v.as_deref()
                .map(openlora::ledger::report::parse_time)
                .transpose()
                .map_err(|m| anyhow::anyhow!("--{flag}: {m}"))
        };
        let range = (time("since", &args.since)?, time("until", &args.until)?);
        return cli_plugin::check_on_ledger(&server, &args.file, &bytes, &config, slot, (range, args.limit), args.json);
    }
    let mut samples = match &args.samples {
        Some(path) => read_samples(path)?,
        None => default_samples(),
    };
    if let Some(slot) = &args.slot {
        samples = cli_plugin::as_slot_sees(samples, slot)?;
    }
    let limits = server.config()?.policy;
    let report = check(&args.file.display().to_string(), &bytes, world, &config, &samples, &limits)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(report.ok);
    }
    println!(
        "{}: {} plugin, {} bytes, sha256 {}",
        args.file.display(),
        report.world.name(),
        report.size,
        report.sha256
    );
    println!("imports: {}", report.imports.join(", "));
    println!("validated, compiled and configured in {:.1} ms", report.load_ms);
    for s in &report.samples {
        let i = &s["inputs"];
        let (r, u) = (&i["request"], &i["usage"]);
        println!(
            "sample {}: tenant {} adapter {} owner {}; {} prompt + {} completion tokens, contribution {} ppm{}",
            s["sample"],
            r["tenant"],
            r["adapter"],
            r["adapter_owner"],
            u["prompt_tokens"],
            u["completion_tokens"],
            u["adapter_contribution_ppm"],
            if i["charge"].is_null() { String::new() } else { format!("; charge {}", i["charge"]) }
        );
        for line in s["logs"].as_array().into_iter().flatten() {
            println!("  log {} {}", line[0], line[1]);
        }
        match s.get("failure") {
            Some(f) => println!("sample {}: FAILED: {}", s["sample"], f.as_str().unwrap_or_default()),
            None => println!(
                "sample {}: {}  (fuel {}, {} µs, {} µs of CPU time of a {} ms deadline{})",
                s["sample"],
                s["decision"],
                s["fuel"],
                s["micros"],
                s["cpu_micros"],
                report.deadline_ms,
                if s["replays_exactly"] == true { ", replays exactly" } else { ", DOES NOT REPLAY" }
            ),
        }
    }
    println!("{}", if report.ok { "ok: every sample gave a valid, replayable decision" } else { "FAILED" });
    Ok(report.ok)
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file (model, adapters, memory budgets, keys, limits).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on, overriding the config file (e.g. 127.0.0.1:8080).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// The device to serve on: cpu, or cuda:N (a CUDA GPU; the driver is probed at start).
    #[arg(long, default_value = "cpu")]
    device: openlora::device::DeviceSpec,
    /// The dtype to keep and multiply the dense weights in, overriding the config file's
    /// `dtype`: auto (as stored), bf16, f16, f32 or int8 (weight-only).
    #[arg(long)]
    dtype: Option<openlora::model::ServeDType>,
    /// Only check the configuration (the file, then the environment's secrets) and exit: 0 when
    /// it is valid, 2 naming the field when not. Nothing is loaded or listened on.
    #[arg(long)]
    check: bool,
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.check {
        ServerConfig::load(args.config.as_deref())?;
        println!("configuration OK");
        return Ok(());
    }
    if let openlora::device::DeviceSpec::Cuda(n) = args.device {
        // Before loading anything: a missing GPU is said at once.
        let info = openlora::device::probe_cuda(n)?;
        tracing::info!(
            ordinal = n,
            gpu = info.name.as_str(),
            memory_gib = info.memory_bytes >> 30,
            "cuda:{n} is {} ({} GiB, compute capability {}.{})",
            info.name,
            info.memory_bytes >> 30,
            info.capability.0,
            info.capability.1
        );
    }
    let mut config = ServerConfig::load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dtype) = args.dtype {
        config.dtype = dtype;
    }
    let server = Server::load(config, args.device)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(server.listen)
            .await
            .with_context(|| format!("listening on {}", server.listen))?;
        let addr = listener.local_addr()?;
        let state = &server.state;
        let adapters = state.engine.pager().names();
        tracing::info!(
            model = state.model_name.as_str(),
            device = %state.engine.device(),
            adapters = adapters.len(),
            listen = %addr,
            "serving `{}` on {} with {} adapter(s) [{}] on http://{addr}",
            state.model_name,
            state.engine.device(),
            adapters.len(),
            adapters.join(", ")
        );
        tracing::info!("try: curl http://{addr}/v1/completions -H 'Content-Type: application/json' -d '{{\"model\": \"{}\", \"prompt\": \"The meaning of life is\", \"max_tokens\": 32}}'", state.model_name);
        server.run(listener).await?;
        anyhow::Ok(())
    })
}

#[derive(Args)]
struct GenerateArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json); default: the embedded model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// PEFT LoRA adapter folder to generate with, or the name of a demo adapter of the
    /// embedded model (startrek, computers, love).
    #[arg(long)]
    adapter: Option<String>,
    /// The prompt text.
    #[arg(long, default_value = "The meaning of life is")]
    prompt: String,
    /// Most new tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy. Default: the model's generation_config.json, else 0.
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1]. Default: the model's generation_config.json, else 1.
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Keep only the k most likely tokens (0 = all). Default: the model's generation_config.json, else 0.
    #[arg(long)]
    top_k: Option<usize>,
    /// Random seed: the same seed gives the same text. Default: random.
    #[arg(long)]
    seed: Option<u64>,
    /// Repetition penalty (> 1 discourages repeats). Default: the model's generation_config.json, else 1.
    #[arg(long, allow_negative_numbers = true)]
    repetition_penalty: Option<f32>,
    /// Stop when this string appears (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// The dtype to keep and multiply the dense weights in: auto (as stored), bf16, f16, f32 or
    /// int8 (weight-only).
    #[arg(long, default_value = "auto")]
    dtype: openlora::model::ServeDType,
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let folder = match &args.model {
        Some(dir) => dir.clone(),
        None => embedded::default_model_dir().context("unpacking the embedded default model")?,
    };
    let t0 = Instant::now();
    let model = Arc::new(LoadedModel::load_as(&folder, args.dtype)?);
    let metrics = Metrics::new();
    let pool = openlora::pager::PoolPlace::for_backend(false, model.serves_bf16());
    let pager =
        AdapterPager::new(model.config(), PagerConfig { pool, ..PagerConfig::default() }, metrics.pager.clone());
    let adapter = match &args.adapter {
        None => None,
        Some(a) => {
            let dir = PathBuf::from(a);
            let dir = if dir.is_dir() || args.model.is_some() || a.contains('/') {
                dir
            } else if embedded::DEMO_ADAPTERS.contains(&a.as_str()) {
                folder.join("adapters").join(a)
            } else {
                anyhow::bail!(
                    "--adapter {a}: no such folder, and not a demo adapter ({})",
                    embedded::DEMO_ADAPTERS.join(", ")
                );
            };
            pager.register(a, &dir)?;
            Some(a.clone())
        }
    };
    let load_ms = t0.elapsed().as_millis();
    let g = &model.generation;
    let sampled = g.do_sample;
    let params = SamplingParams {
        temperature: args.temperature.unwrap_or(if sampled { g.temperature.unwrap_or(1.0) } else { 0.0 }),
        top_p: args.top_p.unwrap_or(if sampled { g.top_p.unwrap_or(1.0) } else { 1.0 }),
        top_k: args.top_k.unwrap_or(if sampled { g.top_k.unwrap_or(0) } else { 0 }),
        seed: args.seed,
        repetition_penalty: args.repetition_penalty.or(g.repetition_penalty).unwrap_or(1.0),
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        max_tokens: args.max_tokens,
        stop: args.stop,
        ignore_eos: args.ignore_eos,
    };
    // The same engine `serve` runs, with one request.
    let engine = EngineHandle::start(model.clone(), pager, EngineConfig::default(), metrics)?;
    let prompt_ids = model.tokenizer.encode(&args.prompt)?;
    let prompt_tokens = prompt_ids.len();
    let request = GenerationRequest {
        id: "generate".into(),
        prompt_ids,
        params,
        adapter,
        priority: 0,
        deadline: None,
        logprobs: None,
    };
    let mut stream = engine.submit(request)?;
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", args.prompt)?;
    stdout.flush()?;
    let t1 = Instant::now();
    let (reason, generated) = loop {
        match stream.next_blocking() {
            Some(Event::Token { text, .. }) => {
                write!(stdout, "{text}").and_then(|_| stdout.flush()).context("writing to stdout")?;
            }
            Some(Event::Done { reason, usage }) => break (reason, usage.completion_tokens),
            Some(Event::Failed { message, .. }) => anyhow::bail!("generation failed: {message}"),
            None => anyhow::bail!("the engine stopped"),
        }
    };
    writeln!(stdout)?;
    let secs = t1.elapsed().as_secs_f64();
    eprintln!(
        "[{} prompt + {} generated tokens, finish_reason={}, {:.1} tok/s, model load {} ms, {}{}]",
        prompt_tokens,
        generated,
        reason.as_str(),
        f64::from(generated) / secs.max(1e-9),
        load_ms,
        folder.display(),
        args.adapter.as_deref().map(|a| format!(", adapter {a}")).unwrap_or_default()
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = init_logging(cli.log_format).and_then(|()| run(cli.command));
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            // The error and its causes, one line; never a backtrace (RUST_BACKTRACE is for panics).
            let text = format!("{e:#}");
            let _ =
                writeln!(std::io::stderr().lock(), "error: {}", text.split_whitespace().collect::<Vec<_>>().join(" "));
            std::process::ExitCode::from(2)
        }
    }
}

/// Runs one command: `Ok(false)` when what it checked failed (exit 1), `Err` when it could not run.
fn run(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Generate(args) => run_generate(args).map(|()| true),
        Command::Serve(args) => run_serve(args).map(|()| true),
        Command::Plugin(PluginCommand::New(args)) => cli_plugin::run_new(args).map(|()| true),
        Command::Plugin(PluginCommand::Check(args)) => run_plugin_check(args),
        Command::Bench(args) => cli_bench::run_bench(args),
        Command::Keys(command) => cli_accounts::run_keys(command).map(|()| true),
        Command::Explain(args) => cli_accounts::run_explain(args),
        Command::Ledger(command) => run_ledger(command),
    }
}
