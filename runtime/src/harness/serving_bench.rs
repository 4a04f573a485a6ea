//! Throughput of the serving path itself on the GPU ([`super::serving`]'s engine run, on a
//! [`GpuBackend`]): at Llama-7B shape, random bf16 weights made on the device, real PEFT adapter
//! folders on disk, it is the figure to set beside `hf_peft_multilora.py`'s.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;
use serde_json::{Value, json};

use super::BenchConfig;
use super::gpu_random;
use super::random::{self, LLAMA_7B_CONFIG, QKVO, RandomAdapter, llama_7b};
use super::serving::{modes, weightless_model};
use crate::engine::{EngineConfig, EngineHandle};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::gpu::backend::GpuBackend;
use crate::gpu::model::GpuKv;
use crate::metrics::Metrics;
use crate::model::{BLOCK_SIZE, LoadedModel};
use crate::pager::{AdapterPager, PagerConfig};

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
    let kv_bytes = c.batch * (c.prompt + c.new_tokens).div_ceil(BLOCK_SIZE) * GpuKv::block_bytes(&cfg);
    let gpu = Gpu::open(c.ordinal)?;
    let llama = gpu_random::llama(&gpu, &cfg, 7)?;
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
