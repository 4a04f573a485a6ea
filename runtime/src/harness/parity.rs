//! The GPU's correctness checks, run by `openlora bench --device cuda:N`: logits against the
//! committed references (Hugging Face transformers, and PEFT for a mixed-adapter batch, on both
//! the segmented prefill and the gathered decode path), and the serving path itself: the same
//! requests through an engine on the CPU backend and one on the GPU backend.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use super::arena::AdapterArena;
use super::serving::serve_all;
use crate::adapters::AdapterManifest;
use crate::engine::backend::{Backend, CpuBackend};
use crate::engine::{EngineConfig, EngineHandle, GenerationRequest};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::gpu::backend::GpuBackend;
use crate::gpu::lora::GpuAdapters;
use crate::gpu::model::{GpuKv, GpuLlama, GpuSeq};
use crate::metrics::Metrics;
use crate::model::{AllocStatus, BLOCK_SIZE, LoadedModel, ModelConfig, SeqKv};
use crate::pager::{AdapterPager, PagerConfig};
use crate::sampling::SamplingParams;

/// How far a GPU's logits may lie from the f32 reference: the device computes in bf16 (weights,
/// activations and KV cache) with f32 accumulation, so each op rounds to 8 significant bits, as
/// transformers computing natively in bf16 does (0.06–0.15 from f32 on these fixtures).
pub const BF16_MAX_ABS_DIFF: f32 = 0.25;
/// The share of rows whose argmax must agree with the reference's.
pub const MIN_ARGMAX_AGREEMENT: f64 = 0.9;
/// How far a GPU-served request's measured adapter contribution may lie from the CPU's:
/// 3%, plus 50 ppm for contributions near zero.
pub fn contribution_agrees(gpu_ppm: u32, cpu_ppm: u32) -> bool {
    let (g, c) = (gpu_ppm as f64, cpu_ppm as f64);
    (g - c).abs() <= 0.03 * c + 50.0
}

/// The tolerance for a fixture: [`BF16_MAX_ABS_DIFF`], or 1.5× how far transformers computing
/// natively in the stored half precision lies from its own f32 logits, when that is more (a
/// model whose every op amplifies rounding — Gemma 3's soft-capped logits after three norms a
/// layer — is that far from f32 in transformers too).
pub fn bf16_tolerance(hf_native_max_abs_diff: f32) -> f32 {
    BF16_MAX_ABS_DIFF.max(1.5 * hf_native_max_abs_diff)
}

/// How far transformers computing natively in the stored half precision lies from its own f32
/// logits over a fixture's prompts (0 for an f32 fixture, which has no such reference).
fn hf_native_diff(r: &std::collections::HashMap<String, candle_core::Tensor>, vocab: usize) -> Result<f32> {
    let mut worst = 0f32;
    let mut n = 0;
    while r.contains_key(&format!("logits_native.{n}")) {
        let native = logits(r, &format!("logits_native.{n}"))?;
        worst = worst.max(compare(&native, &logits(r, &format!("logits.{n}"))?, vocab).0);
        n += 1;
    }
    Ok(worst)
}

/// Whether a comparison is within `tolerance` (see [`bf16_tolerance`]) and agrees on argmax.
fn within(max_abs_diff: f32, argmax_agreement: f64, tolerance: f32) -> bool {
    max_abs_diff <= tolerance && argmax_agreement >= MIN_ARGMAX_AGREEMENT
}

/// Whether every check of a parity report passed (each check carries `"pass"`).
pub fn passed(report: &Value) -> bool {
    match report {
        Value::Object(m) => m.get("pass").is_none_or(|p| p.as_bool() == Some(true)) && m.values().all(passed),
        _ => true,
    }
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
    let v = t.get(key).ok_or_else(|| Error::device(format!("reference has no {key}")))?;
    Ok(v.to_vec1::<i64>()?.into_iter().map(|x| x as u32).collect())
}

fn logits(t: &std::collections::HashMap<String, candle_core::Tensor>, key: &str) -> Result<Vec<f32>> {
    let v = t.get(key).ok_or_else(|| Error::device(format!("reference has no {key}")))?;
    Ok(v.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A KV cache just large enough for `prompts`, and each prompt's blocks in it.
fn kv_for(gpu: &Gpu, cfg: &ModelConfig, prompts: &[(Vec<u32>, Option<u32>)]) -> Result<(GpuKv, Vec<SeqKv>)> {
    let mut kv = GpuKv::new(gpu, cfg, prompts.iter().map(|p| p.0.len().div_ceil(BLOCK_SIZE)).sum::<usize>() + 1)?;
    let mut seqs = Vec::with_capacity(prompts.len());
    for p in prompts {
        let mut s = SeqKv::default();
        if kv.blocks.reserve(&mut s, p.0.len()) != AllocStatus::Ok {
            return Err(Error::device("the parity KV cache is too small"));
        }
        seqs.push(s);
    }
    Ok((kv, seqs))
}

/// Runs `prompts` as one prefill batch (each with its adapter bank) and returns every row's logits.
fn prefill_all(
    gpu: &Gpu,
    model: &GpuLlama,
    adapters: Option<&GpuAdapters>,
    prompts: &[(Vec<u32>, Option<u32>)],
) -> Result<Vec<f32>> {
    let (mut kv, held) = kv_for(gpu, model.config(), prompts)?;
    let blocks: Vec<&[u32]> = held.iter().map(SeqKv::blocks).collect();
    let seqs: Vec<GpuSeq<'_>> =
        prompts.iter().zip(&blocks).map(|((t, a), b)| GpuSeq { tokens: t, start: 0, blocks: b, adapter: *a }).collect();
    model.forward(gpu, &mut kv, adapters, &seqs, true)?.download_logits(gpu)
}

/// Greedy decoding after `prompt` on the base model against transformers' tokens `want`: `None`
/// when every token is transformers', else where the first differs and how far below the
/// device's top logit its logit for transformers' token lies there. Non-finite logits are an error.
fn greedy_parts(gpu: &Gpu, model: &GpuLlama, prompt: &[u32], want: &[u32]) -> Result<Option<(usize, f32)>> {
    let vocab = model.config().vocab_size;
    let (mut kv, held) = kv_for(gpu, model.config(), &[(vec![0; prompt.len() + want.len()], None)])?;
    let blocks = held[0].blocks();
    let (mut tokens, mut start) = (prompt.to_vec(), 0);
    for (at, &expected) in want.iter().enumerate() {
        let seq = GpuSeq { tokens: &tokens[start..], start, blocks, adapter: None };
        let logits = model.forward(gpu, &mut kv, None, &[seq], false)?.download_logits(gpu)?;
        let last = logits.get(logits.len().saturating_sub(vocab)..).unwrap_or_default();
        if last.len() != vocab || !last.iter().all(|v| v.is_finite()) {
            return Err(Error::device(format!("greedy step {at}: {} logits, not all finite", last.len())));
        }
        let best = last.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m });
        if best.0 as u32 != expected {
            let theirs = last.get(expected as usize).copied().unwrap_or(f32::MIN);
            return Ok(Some((at, best.1 - theirs)));
        }
        start = tokens.len();
        tokens.push(expected);
    }
    Ok(None)
}

/// Parity on the committed fixtures; each check reports max |Δ| and argmax agreement, and
/// whether 32 greedy tokens after each prompt are transformers' own: identical, or parting only
/// where the device's logit for transformers' token lies within the tolerance of its top one (a
/// tie at bf16 precision, which transformers computing in bf16 could break either way; measured:
/// 0–0.06 where they part, on random tiny models whose logits are near-ties throughout).
pub fn fixtures(gpu: &Gpu, fixtures: &Path) -> Result<Value> {
    let mut out = serde_json::Map::new();
    let names = [
        "gqa-llama3-f32",
        "tied-f16",
        "mqa-bf16-sharded",
        "qwen2-f32",
        "qwen3-bf16",
        "mistral-window8-f32",
        "gemma3-bf16",
    ];
    for name in names {
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
        let native = hf_native_diff(&r, vocab)?;
        let tolerance = bf16_tolerance(native);
        let agreement = agree / n.max(1) as f64;
        // Greedy tokens after each prompt, as transformers chose them in f32.
        let (mut identical, mut parted) = (0, Vec::new());
        for i in 0..n {
            let want = ids(&r, &format!("greedy.{i}"))?;
            match greedy_parts(gpu, &model, &ids(&r, &format!("input_ids.{i}"))?, &want)? {
                None => identical += 1,
                Some((at, gap)) => parted.push(json!({"prompt": i, "at": at, "below_top": gap})),
            }
        }
        let greedy_pass = parted.iter().all(|p| p["below_top"].as_f64().is_some_and(|g| g <= tolerance as f64));
        out.insert(
            name.into(),
            json!({"prompts": n, "max_abs_diff": worst, "argmax_agreement": agreement,
                   "hf_native_max_abs_diff": native, "tolerance": tolerance,
                   "greedy_identical": identical, "greedy_parted": parted,
                   "pass": within(worst, agreement, tolerance) && greedy_pass}),
        );
    }
    // Mixed adapters against PEFT on every family's base: every row in one batch, prefill (SGMV)
    // and then the last token of every row as one decode step (BGMV).
    for (key, base) in [
        ("mixed_adapters_vs_peft", "gqa-llama3-f32"),
        ("mixed_adapters_vs_peft_qwen2", "qwen2-f32"),
        ("mixed_adapters_vs_peft_qwen3", "qwen3-bf16"),
        ("mixed_adapters_vs_peft_mistral", "mistral-window8-f32"),
        ("mixed_adapters_vs_peft_gemma3", "gemma3-bf16"),
    ] {
        out.insert(key.into(), mixed_adapters(gpu, fixtures, base)?);
    }
    Ok(Value::Object(out))
}

/// The mixed-adapter check on the adapters of base model `base`.
fn mixed_adapters(gpu: &Gpu, fixtures: &Path, base: &str) -> Result<Value> {
    let adir = fixtures.join("adapters").join(base);
    let base = fixtures.join("models").join(base);
    let model = GpuLlama::load(gpu, &base)?;
    let cfg = model.config().clone();
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(adir.join("mixed_reference.json")).map_err(|e| Error::io(&adir, e))?,
    )
    .map_err(|e| Error::device(format!("mixed_reference.json: {e}")))?;
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
    let mut arena = AdapterArena::new(gpu, cfg.num_layers, 1 << 14, cfg.hidden_size, names.len())?;
    let mut banks = Vec::with_capacity(names.len());
    for n in &names {
        let w = AdapterManifest::inspect(&adir.join(n), &cfg)?.load(&cfg)?;
        let resident = arena.place(w)?;
        banks.push(arena.bank_for(gpu, &resident, &banks)?);
    }
    let pool = &arena.device;
    let r = tensors(&adir.join("mixed_reference.safetensors"))?;
    let bank_of = |row: &str| names.iter().position(|n| n == row).map(|s| banks[s]);
    let prompts: Vec<(Vec<u32>, Option<u32>)> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| Ok((ids(&r, &format!("input_ids.{i}"))?, bank_of(row))))
        .collect::<Result<_>>()?;
    let got = prefill_all(gpu, &model, Some(pool), &prompts)?;
    let want: Vec<f32> =
        (0..rows.len()).map(|i| logits(&r, &format!("logits.{i}"))).collect::<Result<Vec<_>>>()?.concat();
    let (m, a) = compare(&got, &want, cfg.vocab_size);
    // Decode: everything but the last token as prefill, then the last tokens as one gathered step.
    let (mut kv, held) = kv_for(gpu, &cfg, &prompts)?;
    let blocks: Vec<&[u32]> = held.iter().map(SeqKv::blocks).collect();
    let heads: Vec<GpuSeq<'_>> = prompts
        .iter()
        .zip(&blocks)
        .filter(|(p, _)| p.0.len() > 1)
        .map(|((t, ad), b)| GpuSeq { tokens: &t[..t.len() - 1], start: 0, blocks: b, adapter: *ad })
        .collect();
    model.forward(gpu, &mut kv, Some(pool), &heads, false)?;
    let tails: Vec<GpuSeq<'_>> = prompts
        .iter()
        .zip(&blocks)
        .filter(|(p, _)| p.0.len() > 1)
        .map(|((t, ad), b)| GpuSeq { tokens: &t[t.len() - 1..], start: t.len() - 1, blocks: b, adapter: *ad })
        .collect();
    let got_last = model.forward(gpu, &mut kv, Some(pool), &tails, false)?.download_logits(gpu)?;
    let v = cfg.vocab_size;
    let want_last: Vec<f32> = prompts
        .iter()
        .enumerate()
        .filter(|(_, p)| p.0.len() > 1)
        .map(|(i, p)| logits(&r, &format!("logits.{i}")).map(|l| l[(p.0.len() - 1) * v..p.0.len() * v].to_vec()))
        .collect::<Result<Vec<_>>>()?
        .concat();
    let (md, ad) = compare(&got_last, &want_last, v);
    // The base model's own distance from f32 in transformers' native bf16 sets the tolerance.
    let tolerance = bf16_tolerance(hf_native_diff(&tensors(&base.join("reference.safetensors"))?, v)?);
    // Argmax agreement is a rate: over the decode step's few rows alone one near-tie is 14%, so
    // it is judged over every row compared (transformers' own bf16 flips the same Gemma 3 row).
    let (prefill_rows, decode_rows) = (want.len() / v, want_last.len() / v);
    let agreement = (a * prefill_rows as f64 + ad * decode_rows as f64) / (prefill_rows + decode_rows).max(1) as f64;
    let pass = within(m.max(md), agreement, tolerance);
    Ok(json!({"rows": rows, "prefill_max_abs_diff": m, "prefill_argmax_agreement": a,
              "decode_max_abs_diff": md, "decode_argmax_agreement": ad, "argmax_agreement": agreement,
              "tolerance": tolerance, "pass": pass}))
}

/// Per request, its tokens and its measured adapter contribution (ppm); and the device.
type Served = (Vec<(Vec<u32>, u32)>, String);

/// Greedy tokens of the same requests (mixed adapters, submitted together so they batch) on an
/// engine over the CPU backend and one over the GPU backend; reports how far they agree.
pub fn serving(ordinal: usize, fixtures: &Path) -> Result<Value> {
    let dir = fixtures.join("models/gqa-llama3-f32");
    let adir = fixtures.join("adapters/gqa-llama3-f32");
    let mut names: Vec<String> = std::fs::read_dir(&adir)
        .map_err(|e| Error::io(&adir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    names.sort();
    let requests: Vec<GenerationRequest> = (0..12)
        .map(|i| GenerationRequest {
            id: format!("parity-{i}"),
            prompt_ids: (0..3 + i * 5).map(|t| (1 + (t * 37 + i * 11) % 250) as u32).collect(),
            params: SamplingParams { max_tokens: 24, ignore_eos: true, ..Default::default() },
            adapter: (i % (names.len() + 1)).checked_sub(1).map(|a| names[a].clone()),
            priority: 0,
            deadline: None,
            logprobs: None,
        })
        .collect();
    let run = |on_gpu: bool| -> Result<Served> {
        let model = Arc::new(if on_gpu { LoadedModel::load_without_weights(&dir)? } else { LoadedModel::load(&dir)? });
        let pool = crate::pager::PoolPlace::for_backend(on_gpu, model.serves_bf16());
        let config = PagerConfig { pool, ..PagerConfig::default() };
        let pager = AdapterPager::new(model.config(), config, Metrics::new().pager);
        for n in &names {
            pager.register(n, &adir.join(n))?;
        }
        let backend: Box<dyn Backend> = if on_gpu {
            Box::new(GpuBackend::open(ordinal, &model, &pager, Some(512 << 20), 8)?)
        } else {
            Box::new(CpuBackend::new(model.clone(), 64 << 20, crate::model::KvDType::F32)?)
        };
        let engine = EngineHandle::start_on(backend, model, pager, EngineConfig::default(), Metrics::new())?;
        let served = serve_all(&engine, requests.clone())?;
        let out = served.into_iter().map(|(tokens, usage)| (tokens, usage.adapter_contribution_ppm)).collect();
        Ok((out, engine.device().to_string()))
    };
    let (cpu, _) = run(false)?;
    let (gpu, device) = run(true)?;
    let prefix = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let same: Vec<usize> = cpu.iter().zip(&gpu).map(|(a, b)| prefix(&a.0, &b.0)).collect();
    let total: usize = cpu.iter().map(|r| r.0.len()).sum();
    let ppm: Vec<(u32, u32)> = cpu.iter().zip(&gpu).map(|(a, b)| (a.1, b.1)).collect();
    // bf16 greedy choices may part from the f32 reference late in a sequence, rarely at once.
    let first_agree = same.iter().filter(|&&n| n > 0).count();
    let pass = first_agree * 10 >= requests.len() * 9 && ppm.iter().all(|&(c, g)| contribution_agrees(g, c));
    Ok(json!({
        "pass": pass,
        "device": device,
        "requests": requests.len(),
        "identical_requests": cpu.iter().zip(&gpu).filter(|(a, b)| a.0 == b.0).count(),
        "agreeing_prefix_tokens": same.iter().sum::<usize>(),
        "tokens": total,
        "first_divergence": same,
        "adapter_contribution_ppm_cpu_gpu": ppm,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_passes_only_when_every_check_does() {
        assert!(passed(&json!({"a": {"pass": true, "x": 1}, "b": {"pass": true}})));
        assert!(!passed(&json!({"a": {"pass": true}, "b": {"c": {"pass": false}}})));
        assert!(!passed(&json!({"error": "x", "pass": false})));
        let t = BF16_MAX_ABS_DIFF;
        assert!(within(0.1, 0.95, t) && !within(0.3, 1.0, t) && !within(0.1, 0.5, t));
        // A fixture transformers itself computes 0.5 from f32 in bf16 gets 1.5 × that; others 0.25.
        assert_eq!((bf16_tolerance(0.0), bf16_tolerance(0.1), bf16_tolerance(0.5)), (t, t, 0.75));
        assert!(contribution_agrees(103_000, 100_000) && !contribution_agrees(104_000, 100_000));
        assert!(contribution_agrees(40, 0) && !contribution_agrees(60, 0));
    }

    #[test]
    fn comparison_reports_the_worst_difference_and_argmax_agreement() {
        let (m, a) = compare(&[1.0, 2.0, 0.5, 0.1], &[1.0, 2.5, 0.4, 0.2], 2);
        assert!((m - 0.5).abs() < 1e-6);
        assert_eq!(a, 1.0);
    }
}
