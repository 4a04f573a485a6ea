//! Throughput of the serving path itself: requests submitted to an engine, the scheduler, the
//! pager with real PEFT adapter folders, host-side sampling — what `serve` runs, minus HTTP.
//! On the GPU at Llama-7B shape (random bf16 weights made on the device), it is the figure to
//! set beside `hf_peft_multilora.py`'s; [`modes`] runs on any backend (a CPU test uses it).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;
use serde_json::{Value, json};

use super::backend::GpuBackend;
use super::bench::{BenchConfig, LLAMA_7B_CONFIG, QKVO, llama_7b};
use super::{Gpu, model::GpuLlama};
use crate::adapters::random::{self, RandomAdapter};
use crate::engine::{EngineConfig, EngineHandle, Event, GenerationRequest, Usage};
use crate::error::{Error, LoadError, Result};
use crate::metrics::Metrics;
use crate::model::{BLOCK_SIZE, LoadedModel};
use crate::pager::{AdapterPager, PagerConfig};
use crate::sampling::SamplingParams;

/// Submits `requests` all at once (so they batch) and reads each to its end: its tokens and
/// what it used.
pub fn serve_all(engine: &EngineHandle, requests: Vec<GenerationRequest>) -> Result<Vec<(Vec<u32>, Usage)>> {
    let streams = requests.into_iter().map(|r| engine.submit(r)).collect::<Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(streams.len());
    for mut s in streams {
        let mut tokens = Vec::new();
        loop {
            match s.next_blocking() {
                Some(Event::Token { id, .. }) => tokens.push(id),
                Some(Event::Done { usage, .. }) => {
                    out.push((tokens, usage));
                    break;
                }
                Some(Event::Failed { message, .. }) => return Err(Error::device(format!("{}: {message}", s.id))),
                None => return Err(Error::device(format!("{}: the engine stopped", s.id))),
            }
        }
    }
    Ok(out)
}

/// Greedy requests of `prompt` tokens generating `new_tokens` each (EOS ignored), one per entry
/// of `adapters`, all submitted at once. Returns the seconds until the last finished and the
/// tokens generated.
pub fn run_batch(
    engine: &EngineHandle,
    adapters: &[Option<String>],
    prompt: usize,
    new_tokens: usize,
) -> Result<(f64, usize)> {
    let vocab = engine.model().config().vocab_size;
    let requests = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| GenerationRequest {
            id: format!("bench-{i}"),
            prompt_ids: (0..prompt).map(|t| ((7 + i * 7919 + t * 104_729) % (vocab - 1) + 1) as u32).collect(),
            params: SamplingParams { max_tokens: new_tokens, ignore_eos: true, ..Default::default() },
            adapter: a.clone(),
            priority: 0,
            deadline: None,
            logprobs: None,
        })
        .collect();
    let t = Instant::now();
    let served = serve_all(engine, requests)?;
    Ok((t.elapsed().as_secs_f64(), served.iter().map(|(tokens, _)| tokens.len()).sum()))
}

/// Base-only, then one of `names` per request (round robin), through `engine`, after a short
/// warm-up of each; tokens per second of each and the mixed run's time over the base run's.
pub fn modes(engine: &EngineHandle, names: &[String], batch: usize, prompt: usize, new_tokens: usize) -> Result<Value> {
    let base = vec![None; batch];
    let mixed: Vec<Option<String>> = (0..batch).map(|i| names.get(i % names.len().max(1)).cloned()).collect();
    let mut out = serde_json::Map::new();
    let mut seconds = Vec::new();
    for (mode, rows) in [("base", &base), ("mixed", &mixed)] {
        run_batch(engine, rows, prompt, new_tokens.min(4))?;
        let (secs, tokens) = run_batch(engine, rows, prompt, new_tokens)?;
        seconds.push(secs);
        out.insert(mode.into(), json!({"tok_per_s": tokens as f64 / secs, "seconds": secs, "tokens": tokens}));
    }
    out.insert("mixed_over_base".into(), json!(seconds[1] / seconds[0]));
    Ok(Value::Object(out))
}

/// A model folder for `cfg` that holds no real weights (a GPU backend makes random ones): its
/// config, the fixture model's tokenizer, and a one-tensor safetensors file.
fn weightless_model(dir: &Path, cfg_text: &str, fixtures: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).map_err(|e| Error::io(dir.join(name), e));
    write("config.json", cfg_text)?;
    let tok = fixtures.join("models/gqa-llama3-f32");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), dir.join(f)).map_err(|e| Error::io(tok.join(f), e))?;
    }
    let placeholder = candle_core::Tensor::zeros(1, DType::BF16, &candle_core::Device::Cpu)?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&std::collections::HashMap::from([("placeholder".to_string(), placeholder)]), &path)
        .map_err(|e| Error::from(LoadError::WeightFile { file: path.clone(), message: e.to_string() }))
}

/// The serving path at Llama-7B shape on `cuda:ordinal`: `c.adapters` rank-`c.rank` PEFT
/// folders on q/k/v/o written to disk and registered, `c.batch` requests of `c.prompt` +
/// `c.new_tokens` tokens, prefills in one step as HF's `generate` does.
pub fn run(c: &BenchConfig, fixtures: &Path) -> Result<Value> {
    let cfg = llama_7b()?;
    let root = std::env::temp_dir().join(format!("openlora-serving-bench-{}", std::process::id()));
    weightless_model(&root.join("model"), LLAMA_7B_CONFIG, fixtures)?;
    let model = Arc::new(LoadedModel::load_without_weights(&root.join("model"))?);
    let t = Instant::now();
    let targets = QKVO;
    let mut names = Vec::with_capacity(c.adapters);
    for i in 0..c.adapters {
        let spec =
            RandomAdapter { rank: c.rank, targets: &targets, scale: 1.0, seed: i as u64 + 1, dtype: DType::BF16 };
        random::write(&root.join(format!("a{i}")), &cfg, &spec)?;
        names.push(format!("a{i}"));
    }
    let written_s = t.elapsed().as_secs_f64();
    // Room for every adapter in the active pool and the host cache; KV for the batch.
    let adapter_values = cfg.num_layers * targets.len() * 2 * c.rank * cfg.hidden_size;
    let pool_bytes = (c.adapters + 1) * adapter_values * 2;
    let config = PagerConfig {
        host_cache_bytes: (c.adapters + 1) * adapter_values * 4,
        active_pool_bytes: pool_bytes,
        pool: crate::pager::PoolPlace::Device,
        ..PagerConfig::default()
    };
    let pager = AdapterPager::new(&cfg, config, Metrics::new().pager);
    for n in &names {
        pager.register(n, &root.join(n))?;
    }
    let kv_bytes = c.batch * (c.prompt + c.new_tokens).div_ceil(BLOCK_SIZE) * super::model::GpuKv::block_bytes(&cfg);
    let gpu = Gpu::open(c.ordinal)?;
    let llama = GpuLlama::random(&gpu, &cfg, 7)?;
    let budget = pool_bytes + kv_bytes + (256 << 20);
    let backend = GpuBackend::with_model(gpu, llama, &pager, Some(budget), c.batch)?;
    let engine_config =
        EngineConfig { max_batch_tokens: c.batch * c.prompt, max_running: c.batch, ..EngineConfig::default() };
    let engine = EngineHandle::start_on(Box::new(backend), model, pager, engine_config, Metrics::new())?;
    let mut report = modes(&engine, &names, c.batch, c.prompt, c.new_tokens)?;
    report["adapter_folders_written_s"] = json!(written_s);
    report["batch"] = json!(c.batch);
    drop(engine);
    std::fs::remove_dir_all(&root).ok();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::CpuBackend;
    use crate::model::Proj;

    /// The harness on the CPU backend: the fixture model, two random PEFT folders.
    #[test]
    fn modes_run_every_request_to_its_length_on_a_backend() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let model = Arc::new(LoadedModel::load(&fixtures.join("models/gqa-llama3-f32")).expect("model"));
        let dir = std::env::temp_dir().join(format!("openlora-serving-modes-{}", std::process::id()));
        let pager = AdapterPager::new(model.config(), PagerConfig::default(), Metrics::new().pager);
        let mut names = Vec::new();
        for i in 0..2 {
            let spec = RandomAdapter { rank: 4, targets: &[Proj::Q, Proj::V], scale: 1.0, seed: i, dtype: DType::F32 };
            random::write(&dir.join(format!("r{i}")), model.config(), &spec).expect("adapter");
            pager.register(&format!("r{i}"), &dir.join(format!("r{i}"))).expect("register");
            names.push(format!("r{i}"));
        }
        let backend = CpuBackend::new(model.clone(), 16 << 20).expect("backend");
        let engine = EngineHandle::start_on(Box::new(backend), model, pager, EngineConfig::default(), Metrics::new())
            .expect("engine");
        let r = modes(&engine, &names, 4, 8, 3).expect("modes");
        assert_eq!(r["base"]["tokens"], 12);
        assert_eq!(r["mixed"]["tokens"], 12);
        assert!(r["mixed_over_base"].as_f64().is_some_and(|x| x > 0.0));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_weightless_7b_folder_loads_as_a_model_without_weights() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let dir = std::env::temp_dir().join(format!("openlora-weightless-{}", std::process::id()));
        weightless_model(&dir, LLAMA_7B_CONFIG, &fixtures).expect("folder");
        let model = LoadedModel::load_without_weights(&dir).expect("loads");
        assert_eq!((model.config().hidden_size, model.config().vocab_size), (4096, 32000));
        assert!(model.llama().is_err(), "no CPU weights");
        std::fs::remove_dir_all(&dir).ok();
    }
}
