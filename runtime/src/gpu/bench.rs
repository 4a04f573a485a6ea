//! `openlora bench --device cuda:N`: the GPU check in one run. Parity first (the committed
//! fixtures: logits against Hugging Face transformers, and a mixed-adapter batch against PEFT,
//! on both the segmented prefill and the gathered decode path), then throughput at the shape of
//! `hf_peft_multilora.py`: a Llama-7B-shaped model with random bf16 weights, rank-16 adapters on
//! q/k/v/o, 128-token prompts and 128 new tokens (greedy), base-only against one distinct adapter
//! per row, and 1,000 registered adapters drawn by power-law popularity through a smaller pool.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::lora::GpuAdapters;
use super::model::{GpuKv, GpuLlama, GpuSeq};
use super::{Gpu, cuda_err};
use crate::adapters::{AdapterManifest, LoraModule, LoraWeights};
use crate::error::{Error, Result};
use crate::model::{ModelConfig, Proj};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The GPU.
    pub ordinal: usize,
    /// The repository's `tests/fixtures` for the parity checks (skipped when `None`).
    pub fixtures: Option<PathBuf>,
    /// Distinct adapters in the mixed batch.
    pub adapters: usize,
    /// Their rank.
    pub rank: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Prompt tokens per sequence.
    pub prompt: usize,
    /// New tokens per sequence.
    pub new_tokens: usize,
    /// Registered adapters for the popularity run (0 skips it).
    pub registered: usize,
}

/// Llama-7B's shape (the HF PEFT baseline's `LlamaConfig`).
fn llama_7b() -> Result<ModelConfig> {
    let dir = std::env::temp_dir().join(format!("openlora-7b-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join("config.json");
    let text = r#"{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16"}"#;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    ModelConfig::from_file(&path)
}

/// Random rank-`rank` weights on q/k/v/o of every layer (A uniform ±1/√in, B ±1/√rank), from `seed`.
fn random_adapter(cfg: &ModelConfig, rank: usize, seed: u64) -> LoraWeights {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next = move || rng.random_range(-1.0f32..1.0);
    let layers = (0..cfg.num_layers)
        .map(|_| {
            let mut mods: [Option<LoraModule>; 7] = Default::default();
            for p in [Proj::Q, Proj::K, Proj::V, Proj::O] {
                let (out, inp) = p.shape(cfg);
                let (sa, sb) = (1.0 / (inp as f32).sqrt(), 1.0 / (rank as f32).sqrt());
                let a = (0..rank * inp).map(|_| next() * sa).collect();
                let bt = (0..rank * out).map(|_| next() * sb * 0.1).collect();
                mods[p as usize] = Some(LoraModule { rank, scale: 2.0, a, bt });
            }
            mods
        })
        .collect();
    LoraWeights { layers, bytes: 0 }
}

/// Largest |a - b| and the share of rows whose argmax agrees, of `[rows, vocab]` logits.
fn compare(got: &[f32], want: &[f32], vocab: usize) -> (f32, f64) {
    let max = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let argmax = |r: &[f32]| r.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0;
    let rows = want.len() / vocab;
    let agree =
        (0..rows).filter(|&r| argmax(&got[r * vocab..][..vocab]) == argmax(&want[r * vocab..][..vocab])).count();
    (max, agree as f64 / rows.max(1) as f64)
}

fn tensors(path: &Path) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
    Ok(candle_core::safetensors::load(path, &candle_core::Device::Cpu)?)
}

fn ids(t: &std::collections::HashMap<String, candle_core::Tensor>, key: &str) -> Result<Vec<u32>> {
    let v = t.get(key).ok_or_else(|| Error::Device(format!("reference has no {key}")))?;
    Ok(v.to_vec1::<i64>()?.into_iter().map(|x| x as u32).collect())
}

fn logits(t: &std::collections::HashMap<String, candle_core::Tensor>, key: &str) -> Result<Vec<f32>> {
    let v = t.get(key).ok_or_else(|| Error::Device(format!("reference has no {key}")))?;
    Ok(v.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Runs `prompts` as one prefill batch (each with its adapter slot) and returns every row's logits.
fn prefill_all(
    gpu: &Gpu,
    model: &GpuLlama,
    adapters: Option<&GpuAdapters>,
    prompts: &[(Vec<u32>, Option<u32>)],
) -> Result<Vec<f32>> {
    let mut kv =
        GpuKv::new(gpu, model.config(), prompts.iter().map(|p| p.0.len().div_ceil(16)).sum::<usize>() + 1, 16)?;
    let blocks: Vec<Vec<u32>> = prompts.iter().map(|p| kv.alloc(p.0.len()).unwrap_or_default()).collect();
    let seqs: Vec<GpuSeq<'_>> =
        prompts.iter().zip(&blocks).map(|((t, a), b)| GpuSeq { tokens: t, start: 0, blocks: b, adapter: *a }).collect();
    gpu.download(&model.forward(gpu, &mut kv, adapters, &seqs, true)?)
}

/// Parity on the committed fixtures; each check reports max |Δ| and argmax agreement.
fn parity(gpu: &Gpu, fixtures: &Path) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for name in ["gqa-llama3-f32", "tied-f16", "mqa-bf16-sharded"] {
        let dir = fixtures.join("models").join(name);
        let model = GpuLlama::load(gpu, &dir)?;
        let r = tensors(&dir.join("reference.safetensors"))?;
        let vocab = model.config().vocab_size;
        let (mut worst, mut agree, mut n) = (0f32, 0f64, 0);
        while r.contains_key(&format!("input_ids.{n}")) {
            let got = prefill_all(gpu, &model, None, &[(ids(&r, &format!("input_ids.{n}"))?, None)])?;
            let (m, a) = compare(&got, &logits(&r, &format!("logits.{n}"))?, vocab);
            (worst, agree, n) = (worst.max(m), agree + a, n + 1);
        }
        out.insert(
            name.into(),
            json!({"prompts": n, "max_abs_diff": worst, "argmax_agreement": agree / n.max(1) as f64}),
        );
    }
    // Mixed adapters against PEFT: every row in one batch, prefill (SGMV) and then the last
    // token of every row as one decode step (BGMV).
    let base = fixtures.join("models/gqa-llama3-f32");
    let adir = fixtures.join("adapters/gqa-llama3-f32");
    let model = GpuLlama::load(gpu, &base)?;
    let cfg = model.config().clone();
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(adir.join("mixed_reference.json")).map_err(|e| Error::io(&adir, e))?,
    )
    .map_err(|e| Error::Device(format!("mixed_reference.json: {e}")))?;
    let rows: Vec<String> = meta["rows"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let names: Vec<String> = {
        let mut v: Vec<String> = rows.iter().filter(|r| *r != "__base__").cloned().collect();
        v.sort();
        v.dedup();
        v
    };
    let mut pool = GpuAdapters::new(gpu, cfg.num_layers, 64 << 20, 64, names.len(), 1 << 16, 64)?;
    for (slot, n) in names.iter().enumerate() {
        let w = AdapterManifest::inspect(&adir.join(n), &cfg)?.load(&cfg)?;
        pool.place(gpu, slot, &w)?;
    }
    let r = tensors(&adir.join("mixed_reference.safetensors"))?;
    let slot_of = |row: &str| names.iter().position(|n| n == row).map(|s| s as u32);
    let prompts: Vec<(Vec<u32>, Option<u32>)> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| Ok((ids(&r, &format!("input_ids.{i}"))?, slot_of(row))))
        .collect::<Result<_>>()?;
    let got = prefill_all(gpu, &model, Some(&pool), &prompts)?;
    let want: Vec<f32> =
        (0..rows.len()).map(|i| logits(&r, &format!("logits.{i}"))).collect::<Result<Vec<_>>>()?.concat();
    let (m, a) = compare(&got, &want, cfg.vocab_size);
    // Decode: everything but the last token as prefill, then the last tokens as one gathered step.
    let mut kv = GpuKv::new(gpu, &cfg, prompts.iter().map(|p| p.0.len().div_ceil(16)).sum::<usize>() + 1, 16)?;
    let blocks: Vec<Vec<u32>> = prompts.iter().map(|p| kv.alloc(p.0.len()).unwrap_or_default()).collect();
    let heads: Vec<GpuSeq<'_>> = prompts
        .iter()
        .zip(&blocks)
        .filter(|(p, _)| p.0.len() > 1)
        .map(|((t, ad), b)| GpuSeq { tokens: &t[..t.len() - 1], start: 0, blocks: b, adapter: *ad })
        .collect();
    model.forward(gpu, &mut kv, Some(&pool), &heads, false)?;
    let tails: Vec<GpuSeq<'_>> = prompts
        .iter()
        .zip(&blocks)
        .filter(|(p, _)| p.0.len() > 1)
        .map(|((t, ad), b)| GpuSeq { tokens: &t[t.len() - 1..], start: t.len() - 1, blocks: b, adapter: *ad })
        .collect();
    let got_last = gpu.download(&model.forward(gpu, &mut kv, Some(&pool), &tails, false)?)?;
    let v = cfg.vocab_size;
    let want_last: Vec<f32> = prompts
        .iter()
        .enumerate()
        .filter(|(_, p)| p.0.len() > 1)
        .map(|(i, p)| logits(&r, &format!("logits.{i}")).map(|l| l[(p.0.len() - 1) * v..p.0.len() * v].to_vec()))
        .collect::<Result<Vec<_>>>()?
        .concat();
    let (md, ad) = compare(&got_last, &want_last, v);
    out.insert(
        "mixed_adapters_vs_peft".into(),
        json!({"rows": rows, "prefill_max_abs_diff": m, "prefill_argmax_agreement": a,
               "decode_max_abs_diff": md, "decode_argmax_agreement": ad}),
    );
    Ok(Value::Object(out))
}

/// Times greedy generation: one prefill step for the batch, then `new_tokens - 1` decode steps.
/// Returns (total seconds, mean decode step ms).
fn generate(
    gpu: &Gpu,
    model: &GpuLlama,
    kv: &mut GpuKv,
    adapters: Option<&GpuAdapters>,
    slots: &[Option<u32>],
    prompt: usize,
    new_tokens: usize,
) -> Result<(f64, f64)> {
    let cfg = model.config();
    let batch = slots.len();
    let prompts: Vec<Vec<u32>> =
        (0..batch).map(|i| (0..prompt).map(|t| (100 + (i * 7919 + t * 104_729) % 29_000) as u32).collect()).collect();
    let blocks: Vec<Vec<u32>> = (0..batch)
        .map(|_| kv.alloc(prompt + new_tokens).ok_or_else(|| Error::Device("KV cache too small".into())))
        .collect::<Result<_>>()?;
    let greedy = (vec![0f32; batch], vec![0u64; batch]);
    gpu.synchronize()?;
    let t0 = Instant::now();
    let seqs: Vec<GpuSeq<'_>> =
        (0..batch).map(|i| GpuSeq { tokens: &prompts[i], start: 0, blocks: &blocks[i], adapter: slots[i] }).collect();
    let mut next = model.sample(gpu, &model.forward(gpu, kv, adapters, &seqs, false)?, &greedy.0, &greedy.1)?;
    let t1 = Instant::now();
    for step in 1..new_tokens {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t % cfg.vocab_size as u32]).collect();
        let seqs: Vec<GpuSeq<'_>> = (0..batch)
            .map(|i| GpuSeq { tokens: &toks[i], start: prompt + step - 1, blocks: &blocks[i], adapter: slots[i] })
            .collect();
        next = model.sample(gpu, &model.forward(gpu, kv, adapters, &seqs, false)?, &greedy.0, &greedy.1)?;
    }
    let total = t0.elapsed().as_secs_f64();
    let decode_ms = t1.elapsed().as_secs_f64() * 1e3 / (new_tokens.max(2) - 1) as f64;
    for b in &blocks {
        kv.release(b);
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
    eprintln!("openlora bench: {}", report["device"]);
    if let Some(f) = &c.fixtures {
        let p = parity(&gpu, f)?;
        eprintln!("parity: {p}");
        report["parity"] = p;
    }
    let cfg = llama_7b()?;
    let t = Instant::now();
    let model = GpuLlama::random(&gpu, &cfg, 7)?;
    gpu.synchronize()?;
    report["init_s"] = json!(t.elapsed().as_secs_f64());
    // 16-token blocks for every sequence's prompt and new tokens (and the popularity run's).
    let per_seq = (c.prompt + c.new_tokens).div_ceil(16);
    let mut kv = GpuKv::new(&gpu, &cfg, per_seq * c.batch + 1, 16)?;
    // One page per rank-row of q/k/v/o at hidden 4096: 32 pages a module, 4,096 an adapter.
    let slots = c.adapters.max(64);
    let pages_per_adapter = 32 * 4 * 2 * c.rank;
    let mut pool = GpuAdapters::new(
        &gpu,
        cfg.num_layers,
        slots * pages_per_adapter * 4096 * 2,
        4096,
        slots,
        pages_per_adapter,
        c.rank,
    )?;
    let t = Instant::now();
    for a in 0..c.adapters {
        pool.place(&gpu, a, &random_adapter(&cfg, c.rank, a as u64 + 1))?;
    }
    report["adapter_load_s"] = json!(t.elapsed().as_secs_f64());
    let mut modes = serde_json::Map::new();
    for (mode, slots) in [
        ("base", vec![None; c.batch]),
        ("one", vec![Some(0); c.batch]),
        ("mixed", (0..c.batch).map(|i| Some((i % c.adapters) as u32)).collect::<Vec<_>>()),
    ] {
        let adapters = slots.iter().any(Option::is_some).then_some(&pool);
        generate(&gpu, &model, &mut kv, adapters, &slots, c.prompt, c.new_tokens.min(8))?; // warm-up
        let (secs, step_ms) = generate(&gpu, &model, &mut kv, adapters, &slots, c.prompt, c.new_tokens)?;
        let tps = (c.batch * c.new_tokens) as f64 / secs;
        eprintln!("batch {} {mode}: {tps:.0} tok/s, {step_ms:.2} ms per decode step", c.batch);
        modes.insert(mode.into(), json!({"tok_per_s": tps, "seconds": secs, "decode_step_ms": step_ms}));
    }
    let ratio = modes["mixed"]["decode_step_ms"].as_f64().unwrap_or(0.0)
        / modes["base"]["decode_step_ms"].as_f64().unwrap_or(1.0);
    report["batch"] = json!(c.batch);
    report["modes"] = Value::Object(modes);
    report["mixed_over_base_step"] = json!(ratio);
    if c.registered > 0 {
        report["popularity"] = popularity(&gpu, &model, &mut kv, &mut pool, c, slots)?;
    }
    gpu.ctx.synchronize().map_err(cuda_err)?;
    Ok(report)
}

/// `registered` adapters, popularity ∝ 1/rank (Zipf), batches of `batch` requests through a pool
/// of `slots` resident adapters (least recently used evicted; misses are generated on the host,
/// as a read from disk would be, and uploaded on the copy stream).
fn popularity(
    gpu: &Gpu,
    model: &GpuLlama,
    kv: &mut GpuKv,
    pool: &mut GpuAdapters,
    c: &BenchConfig,
    slots: usize,
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
    let mut resident: Vec<Option<(usize, u64)>> = vec![None; slots];
    let (mut clock, mut loads, mut tokens) = (0u64, 0usize, 0usize);
    let new_tokens = 32;
    let t = Instant::now();
    for _ in 0..8 {
        let mut row_slots = Vec::with_capacity(c.batch);
        for _ in 0..c.batch {
            let id = draw();
            clock += 1;
            let slot = match resident.iter().position(|r| r.is_some_and(|(a, _)| a == id)) {
                Some(s) => s,
                None => {
                    let s = (0..slots).min_by_key(|&s| resident[s].map_or(0, |(_, used)| used)).unwrap_or(0);
                    pool.place(gpu, s, &random_adapter(&cfg, c.rank, id as u64 + 1))?;
                    loads += 1;
                    s
                }
            };
            resident[slot] = Some((id, clock));
            row_slots.push(Some(slot as u32));
        }
        generate(gpu, model, kv, Some(pool), &row_slots, c.prompt, new_tokens)?;
        tokens += c.batch * new_tokens;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(json!({"registered": c.registered, "resident_slots": slots, "batches": 8, "adapter_loads": loads,
              "tok_per_s": tokens as f64 / secs}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_benchmark_shape_is_llama_7b() {
        let cfg = llama_7b().unwrap();
        assert_eq!((cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.vocab_size), (4096, 32, 11008, 32000));
        let w = random_adapter(&cfg, 16, 1);
        let q = w.layers[3][Proj::Q as usize].as_ref().unwrap();
        assert_eq!((q.a.len(), q.bt.len()), (16 * 4096, 16 * 4096));
        assert!(w.layers[0][Proj::Gate as usize].is_none());
    }

    #[test]
    fn comparison_reports_the_worst_difference_and_argmax_agreement() {
        let (m, a) = compare(&[1.0, 2.0, 0.5, 0.1], &[1.0, 2.5, 0.4, 0.2], 2);
        assert!((m - 0.5).abs() < 1e-6);
        assert_eq!(a, 1.0);
    }
}
