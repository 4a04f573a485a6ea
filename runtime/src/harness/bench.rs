//! `openlora bench --device cuda:N`: the GPU check in one run. Parity first (the committed
//! fixtures: logits against Hugging Face transformers, and a mixed-adapter batch against PEFT,
//! on both the segmented prefill and the gathered decode path), then throughput at the shape of
//! `hf_peft_multilora.py`: a Llama-7B-shaped model with random bf16 weights, rank-16 adapters on
//! q/k/v/o, 128-token prompts and 128 new tokens (greedy), base-only against one distinct adapter
//! per row, and 1,000 registered adapters drawn by power-law popularity through a smaller pool.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::BenchConfig;
use super::arena::AdapterArena;
use super::random::{llama_7b, random_adapter};
use super::{gpu_random, parity, serving_bench};
use crate::error::{Error, Result};
use crate::gpu::lora::GpuAdapters;
use crate::gpu::model::{GpuKv, GpuLlama, GpuSeq};
use crate::gpu::{Gpu, cuda_err};
use crate::model::{AllocStatus, BLOCK_SIZE, SeqKv};

/// Times greedy generation: one prefill step for the batch, then `new_tokens - 1` decode steps.
/// Returns (total seconds, mean decode step ms).
fn generate(
    gpu: &Gpu,
    model: &GpuLlama,
    kv: &mut GpuKv,
    adapters: Option<&GpuAdapters>,
    banks: &[Option<u32>],
    prompt: usize,
    new_tokens: usize,
) -> Result<(f64, f64)> {
    let cfg = model.config();
    let batch = banks.len();
    let prompts: Vec<Vec<u32>> =
        (0..batch).map(|i| (0..prompt).map(|t| (100 + (i * 7919 + t * 104_729) % 29_000) as u32).collect()).collect();
    let mut held = vec![SeqKv::default(); batch];
    for h in &mut held {
        if kv.blocks.reserve(h, prompt + new_tokens) != AllocStatus::Ok {
            return Err(Error::device("the benchmark's KV cache is too small"));
        }
    }
    let blocks: Vec<&[u32]> = held.iter().map(SeqKv::blocks).collect();
    let greedy = (vec![0f32; batch], vec![0u64; batch]);
    gpu.synchronize()?;
    let t0 = Instant::now();
    let seqs: Vec<GpuSeq<'_>> =
        (0..batch).map(|i| GpuSeq { tokens: &prompts[i], start: 0, blocks: blocks[i], adapter: banks[i] }).collect();
    let mut next = model.forward(gpu, kv, adapters, &seqs, false)?.sample(gpu, &greedy.0, &greedy.1)?;
    let t1 = Instant::now();
    for step in 1..new_tokens {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t % cfg.vocab_size as u32]).collect();
        let seqs: Vec<GpuSeq<'_>> = (0..batch)
            .map(|i| GpuSeq { tokens: &toks[i], start: prompt + step - 1, blocks: blocks[i], adapter: banks[i] })
            .collect();
        next = model.forward(gpu, kv, adapters, &seqs, false)?.sample(gpu, &greedy.0, &greedy.1)?;
    }
    let total = t0.elapsed().as_secs_f64();
    let decode_ms = t1.elapsed().as_secs_f64() * 1e3 / (new_tokens.max(2) - 1) as f64;
    for h in &mut held {
        kv.blocks.release(h);
    }
    Ok((total, decode_ms))
}

/// The whole GPU check; returns the report (also printed line by line as it goes).
pub fn run(c: &BenchConfig) -> Result<Value> {
    let gpu = Gpu::open(c.ordinal)?;
    let mut report = json!({
        "device": {"name": gpu.info.name, "capability": format!("{}.{}", gpu.info.capability.0, gpu.info.capability.1),
                   "memory_gib": gpu.info.memory_bytes >> 30},
        "commit": option_env!("OPENLORA_GIT_COMMIT").unwrap_or("unknown"),
    });
    tracing::info!(device = %report["device"], "openlora bench");
    if let Some(f) = &c.fixtures {
        report["parity"] = section("parity", || parity::fixtures(&gpu, f));
        report["serving_parity"] = section("serving parity", || parity::serving(c.ordinal, f));
    }
    if c.parity_only {
        return Ok(report);
    }
    report["throughput"] = section("throughput", || throughput(&gpu, c));
    if let Some(f) = &c.fixtures {
        // The same shape through the engine, as `serve` runs it.
        report["serving_throughput"] = section("serving throughput", || serving_bench::run(c, f));
    }
    gpu.ctx.synchronize().map_err(cuda_err)?;
    Ok(report)
}

/// A section's report, or its error (so one failing check does not hide the others' figures).
fn section(name: &str, f: impl FnOnce() -> Result<Value>) -> Value {
    let t = Instant::now();
    let v = f().unwrap_or_else(|e| json!({"error": e.to_string(), "pass": false}));
    tracing::info!(run = name, seconds = t.elapsed().as_secs_f64(), result = %v, "benchmark run done");
    v
}

/// Throughput at Llama-7B shape: base, one adapter, one distinct adapter per row, then the
/// power-law run.
fn throughput(gpu: &Gpu, c: &BenchConfig) -> Result<Value> {
    let mut report = json!({});
    let cfg = llama_7b()?;
    let t = Instant::now();
    let model = gpu_random::llama(gpu, &cfg, 7)?;
    gpu.synchronize()?;
    report["init_s"] = json!(t.elapsed().as_secs_f64());
    // Blocks for every sequence's prompt and new tokens (and the popularity run's).
    let per_seq = (c.prompt + c.new_tokens).div_ceil(BLOCK_SIZE);
    let mut kv = GpuKv::new(gpu, &cfg, per_seq * c.batch + 1)?;
    // Pages of 4,096 values (the hidden size): one per rank-row of q/k/v/o, 4,096 an adapter.
    let banks = c.adapters.max(64);
    let pages_per_adapter = cfg.num_layers * 4 * 2 * c.rank;
    let mut arena = AdapterArena::new(gpu, cfg.num_layers, banks * pages_per_adapter, cfg.hidden_size, banks)?;
    let t = Instant::now();
    let mut ids = Vec::with_capacity(c.adapters);
    for a in 0..c.adapters {
        let resident = arena.place(random_adapter(&cfg, c.rank, a as u64 + 1))?;
        ids.push(arena.bank_for(gpu, &resident, &ids)?);
    }
    report["adapter_load_s"] = json!(t.elapsed().as_secs_f64());
    let mut modes = serde_json::Map::new();
    for (mode, rows) in [
        ("base", vec![None; c.batch]),
        ("one", vec![Some(ids[0]); c.batch]),
        ("mixed", (0..c.batch).map(|i| Some(ids[i % c.adapters])).collect::<Vec<_>>()),
    ] {
        let adapters = rows.iter().any(Option::is_some).then_some(&arena.device);
        generate(gpu, &model, &mut kv, adapters, &rows, c.prompt, c.new_tokens.min(8))?; // warm-up
        let (secs, step_ms) = generate(gpu, &model, &mut kv, adapters, &rows, c.prompt, c.new_tokens)?;
        let tps = (c.batch * c.new_tokens) as f64 / secs;
        tracing::info!(batch = c.batch, mode = %mode, tokens_per_second = tps, ms_per_step = step_ms, "throughput");
        modes.insert(mode.into(), json!({"tok_per_s": tps, "seconds": secs, "decode_step_ms": step_ms}));
    }
    let ratio = modes["mixed"]["decode_step_ms"].as_f64().unwrap_or(0.0)
        / modes["base"]["decode_step_ms"].as_f64().unwrap_or(1.0);
    report["batch"] = json!(c.batch);
    report["modes"] = Value::Object(modes);
    report["mixed_over_base_step"] = json!(ratio);
    if c.registered > 0 {
        // The mixed run's adapters leave; the power-law run brings its own through the arena.
        arena = AdapterArena::new(gpu, cfg.num_layers, banks * pages_per_adapter, cfg.hidden_size, c.batch)?;
        report["popularity"] = section("popularity", || popularity(gpu, &model, &mut kv, &mut arena, c, banks));
    }
    Ok(report)
}

/// `registered` adapters, popularity ∝ 1/rank (Zipf), batches of `batch` requests through a pool
/// of `banks` resident adapters (least recently used evicted; misses are generated on the host,
/// as a read from disk would be, and uploaded on the copy stream).
fn popularity(
    gpu: &Gpu,
    model: &GpuLlama,
    kv: &mut GpuKv,
    arena: &mut AdapterArena,
    c: &BenchConfig,
    banks: usize,
) -> Result<Value> {
    let cfg = model.config().clone();
    let weights: Vec<f64> = (1..=c.registered).map(|r| 1.0 / r as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut rng = StdRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
    let mut draw = move || {
        let mut u = rng.random_range(0.0..total);
        weights
            .iter()
            .position(|w| {
                u -= w;
                u <= 0.0
            })
            .unwrap_or(0)
    };
    // Adapter id → its placement in the arena and when it was last used.
    let mut resident: std::collections::HashMap<usize, (crate::pager::pool::ResidentAdapter, u64)> = Default::default();
    let (mut clock, mut loads, mut tokens) = (0u64, 0usize, 0usize);
    let new_tokens = 32;
    let uploads_before = arena.device.uploads;
    let t = Instant::now();
    for _ in 0..8 {
        let batch_ids: Vec<usize> = (0..c.batch).map(|_| draw()).collect();
        let mut row_banks = Vec::with_capacity(c.batch);
        let mut busy = Vec::with_capacity(c.batch);
        for &id in &batch_ids {
            clock += 1;
            if !resident.contains_key(&id) {
                if resident.len() >= banks {
                    let victim = resident
                        .iter()
                        .filter(|(a, _)| !batch_ids.contains(a))
                        .min_by_key(|(_, (_, used))| *used)
                        .map(|(a, _)| *a);
                    if let Some((r, _)) = victim.and_then(|v| resident.remove(&v)) {
                        arena.release(&r);
                    }
                }
                // Made on the host, as a read from disk would be.
                resident.insert(id, (arena.place(random_adapter(&cfg, c.rank, id as u64 + 1))?, clock));
                loads += 1;
            }
            let Some((r, used)) = resident.get_mut(&id) else { unreachable!("inserted above") };
            *used = clock;
            let bank = arena.bank_for(gpu, r, &busy)?;
            busy.push(bank);
            row_banks.push(Some(bank));
        }
        generate(gpu, model, kv, Some(&arena.device), &row_banks, c.prompt, new_tokens)?;
        tokens += c.batch * new_tokens;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(json!({"registered": c.registered, "resident_adapters": banks, "batches": 8, "adapter_loads": loads,
              "device_uploads": arena.device.uploads - uploads_before, "tok_per_s": tokens as f64 / secs}))
}
