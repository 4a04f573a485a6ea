//! The serving path driven as `serve` drives it, minus HTTP: requests submitted to an engine,
//! the scheduler, the pager with real PEFT adapter folders, host-side sampling. Runs on any
//! backend (the CPU tests below use the CPU's); the GPU parity check and the GPU serving
//! benchmark (`harness::serving_bench`, feature `cuda`) run on it.

use std::path::Path;
use std::time::Instant;

use candle_core::DType;
use serde_json::{Value, json};

use crate::engine::{EngineHandle, Event, GenerationRequest, Usage};
use crate::error::{Error, LoadError, Result};
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
pub fn weightless_model(dir: &Path, cfg_text: &str, fixtures: &Path) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::EngineConfig;
    use crate::engine::backend::CpuBackend;
    use crate::harness::random::LLAMA_7B_CONFIG;
    use crate::harness::random::{self, RandomAdapter};
    use crate::metrics::Metrics;
    use crate::model::{LoadedModel, Proj};
    use crate::pager::{AdapterPager, PagerConfig};

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
        let backend = CpuBackend::new(model.clone(), 16 << 20, crate::model::KvDType::F32).expect("backend");
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
