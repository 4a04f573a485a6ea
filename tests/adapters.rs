//! PEFT adapters: parity with PEFT's mixed-adapter batches, and refusal of what is unsupported.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{max_abs_diff, repo_root};
use openlora::Error;
use openlora::error::SubmitError;
use openlora::harness::reference::{WithAdapter, generate};
use openlora::metrics::Metrics;
use openlora::model::{LoadedModel, LogitRows, SeqBatch, SeqKv, ServeDType};
use openlora::pager::{AdapterLease, AdapterPager, PagerConfig, PoolPlace};
use openlora::sampling::SamplingParams;

const TOL: f32 = 1e-4;

fn adapters_dir() -> PathBuf {
    repo_root().join("tests/fixtures/adapters/gqa-llama3-f32")
}

struct Mixed {
    rows: Vec<String>,
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
}

/// Every base model with fixture adapters (one per model family), by its folder name.
fn bases() -> Vec<String> {
    let dir = repo_root().join("tests/fixtures/adapters");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .expect("adapter fixtures")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| dir.join(n).join("mixed_reference.json").exists())
        .collect();
    out.sort();
    assert!(out.len() >= 4, "adapter fixtures for every family: {out:?}");
    out
}

impl Mixed {
    fn load(base: &str) -> Self {
        let dir = repo_root().join("tests/fixtures/adapters").join(base);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("mixed_reference.json")).expect("json"))
                .expect("parses");
        let rows =
            meta["rows"].as_array().expect("rows").iter().map(|r| r.as_str().expect("str").to_string()).collect();
        let tensors =
            candle_core::safetensors::load(dir.join("mixed_reference.safetensors"), &candle_core::Device::Cpu)
                .expect("reference");
        Mixed { rows, tensors }
    }
    /// Every row's prompt ids, in row order.
    fn prompts(&self) -> Vec<Vec<u32>> {
        (0..self.rows.len()).map(|i| self.ids("input_ids", i)).collect()
    }
    fn ids(&self, key: &str, i: usize) -> Vec<u32> {
        self.tensors[&format!("{key}.{i}")].to_vec1::<i64>().expect("ids").into_iter().map(|x| x as u32).collect()
    }
}

fn setup(base: &str) -> (LoadedModel, AdapterPager, Mixed) {
    setup_as(base, ServeDType::Auto)
}

/// The fixture model served in `dtype`, its adapter pool where a server would put it (bf16
/// values when served in bf16).
fn setup_as(base: &str, dtype: ServeDType) -> (LoadedModel, AdapterPager, Mixed) {
    let model = LoadedModel::load_as(&repo_root().join("tests/fixtures/models").join(base), dtype).expect("base model");
    let config = PagerConfig { pool: PoolPlace::for_backend(false, model.serves_bf16()), ..PagerConfig::default() };
    let pager = AdapterPager::new(model.config(), config, Metrics::new().pager);
    let mixed = Mixed::load(base);
    let mut names: Vec<&String> = mixed.rows.iter().filter(|r| *r != "__base__").collect();
    names.sort();
    names.dedup();
    for name in names {
        let dir = repo_root().join("tests/fixtures/adapters").join(base).join(name);
        pager.register(name, &dir).expect("fixture adapter registers");
    }
    (model, pager, mixed)
}

fn leases(pager: &AdapterPager, rows: &[String]) -> Vec<Option<AdapterLease>> {
    rows.iter().map(|r| (r != "__base__").then(|| pager.acquire(r, Duration::from_secs(5)).expect("acquire"))).collect()
}

/// Prefill of every row in one flat batch (the segmented, SGMV path) matches PEFT.
#[test]
fn mixed_adapter_prefill_matches_peft() {
    for base in bases() {
        mixed_prefill(&base, ServeDType::Auto, TOL);
    }
}

/// Served in bf16 — the weights and the adapter pool in bf16, as transformers + PEFT cast to
/// bf16 hold them — the mixed batch stays within the bf16 tolerance of PEFT's f32 logits (the
/// base model's: 0.25, or 1.5x how far transformers computing in bf16 lies from its own f32).
#[test]
fn mixed_adapters_served_in_bf16_match_peft_within_bf16_tolerance() {
    for base in bases() {
        let r = common::Reference::load(&repo_root().join("tests/fixtures/models").join(&base));
        let native = (0..r.prompts.len())
            .filter_map(|i| Some(max_abs_diff(&r.logits("logits_native", i)?, &r.logits("logits", i)?)))
            .fold(0f32, f32::max);
        mixed_prefill(&base, ServeDType::Bf16, openlora::harness::parity::bf16_tolerance(native));
    }
}

fn mixed_prefill(base: &str, dtype: ServeDType, tol: f32) {
    let (model, pager, mixed) = setup_as(base, dtype);
    assert_eq!(model.serves_bf16(), dtype == ServeDType::Bf16, "{base}");
    assert_eq!(
        pager.pool().place() == PoolPlace::HostBf16,
        model.serves_bf16(),
        "{base}: the pool follows the weights"
    );
    let leases = leases(&pager, &mixed.rows);
    let prompts = mixed.prompts();
    let mut cache = model.llama().expect("CPU weights").kv_cache_for(prompts.len());
    let mut caches: Vec<SeqKv> = prompts.iter().map(|_| SeqKv::default()).collect();
    let pool = pager.pool();
    let mut batch: Vec<SeqBatch<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .zip(&leases)
        .map(|((ids, kv), l)| SeqBatch { tokens: ids, kv, adapter: l.as_ref().map(|l| l.placed()) })
        .collect();
    let got = model
        .llama()
        .expect("CPU weights")
        .forward(&mut cache, &mut batch, LogitRows::All, Some(pool.view()))
        .expect("forward");
    let mut row = 0;
    for (i, ids) in prompts.iter().enumerate() {
        let want = &mixed.tensors[&format!("logits.{i}")];
        let d = max_abs_diff(&got.narrow(0, row, ids.len()).expect("rows"), want);
        println!("{base} row {i} ({}) in {dtype}: max |Δ| vs PEFT = {d:.3e}", mixed.rows[i]);
        assert!(d <= tol, "{base} row {i} ({}) in {dtype}: max |Δ| {d}", mixed.rows[i]);
        row += ids.len();
    }
}

/// One decode step of every row together (the gathered, BGMV path) matches PEFT.
#[test]
fn mixed_adapter_decode_step_matches_peft() {
    for base in bases() {
        mixed_decode(&base);
    }
}

fn mixed_decode(base: &str) {
    let (model, pager, mixed) = setup(base);
    let leases = leases(&pager, &mixed.rows);
    let prompts = mixed.prompts();
    let mut cache = model.llama().expect("CPU weights").kv_cache_for(prompts.len());
    let mut caches: Vec<SeqKv> = prompts.iter().map(|_| SeqKv::default()).collect();
    let pool = pager.pool();
    for ((ids, kv), l) in prompts.iter().zip(caches.iter_mut()).zip(&leases) {
        let seq = SeqBatch { tokens: &ids[..ids.len() - 1], kv, adapter: l.as_ref().map(|l| l.placed()) };
        model
            .llama()
            .expect("CPU weights")
            .forward(&mut cache, &mut [seq], LogitRows::Last, Some(pool.view()))
            .expect("prefill");
    }
    let mut batch: Vec<SeqBatch<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .zip(&leases)
        .map(|((ids, kv), l)| SeqBatch { tokens: &ids[ids.len() - 1..], kv, adapter: l.as_ref().map(|l| l.placed()) })
        .collect();
    let got = model
        .llama()
        .expect("CPU weights")
        .forward(&mut cache, &mut batch, LogitRows::All, Some(pool.view()))
        .expect("decode");
    for (i, ids) in prompts.iter().enumerate() {
        let want = mixed.tensors[&format!("logits.{i}")].narrow(0, ids.len() - 1, 1).expect("last row");
        let d = max_abs_diff(&got.narrow(0, i, 1).expect("row"), &want);
        assert!(d <= TOL, "{base} row {i} ({}): max |Δ| {d}", mixed.rows[i]);
    }
}

#[test]
fn greedy_tokens_with_adapters_match_peft() {
    for base in bases() {
        greedy_with_adapters(&base);
    }
}

fn greedy_with_adapters(base: &str) {
    let (model, pager, mixed) = setup(base);
    let leases = leases(&pager, &mixed.rows);
    for (i, lease) in leases.iter().enumerate() {
        let want = mixed.ids("greedy", i);
        let params = SamplingParams { max_tokens: want.len(), ignore_eos: true, ..Default::default() };
        let adapter = lease.as_ref().map(|lease| WithAdapter { pager: &pager, lease });
        let got = generate(&model, &mixed.ids("input_ids", i), params, adapter, &mut |_| {}).expect("generate");
        assert_eq!(got.token_ids, want, "{base} row {i} ({})", mixed.rows[i]);
    }
}

/// A fresh copy of one fixture adapter in a temporary folder.
fn copy_adapter(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("openlora-adapter-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).expect("temp dir");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapters_dir().join(name).join(f), dst.join(f)).expect("copy");
    }
    dst
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let p = dir.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
    v[key] = value;
    std::fs::write(&p, v.to_string()).expect("write");
}

fn register_err(pager: &AdapterPager, dir: &Path) -> String {
    let before = pager.names();
    let e = pager.register("broken", dir).expect_err("broken adapter must be refused");
    assert_eq!(pager.names(), before, "a refused adapter changed the registry");
    e.to_string()
}

#[test]
fn unsupported_adapters_are_refused_naming_the_field() {
    let (_model, pager, _) = setup("gqa-llama3-f32");
    for (key, value) in [
        ("use_dora", serde_json::json!(true)),
        ("bias", serde_json::json!("lora_only")),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("alpha_pattern", serde_json::json!({"q_proj": 4})),
        ("brand_new_scaling", serde_json::json!(2.5)),
    ] {
        let dir = copy_adapter("r4-qv", key);
        edit_config(&dir, key, value);
        let msg = register_err(&pager, &dir);
        assert!(msg.contains(&format!("`{key}`")) && msg.contains("adapter_config.json"), "{key}: {msg}");
    }
}

#[test]
fn target_modules_must_cover_the_tensors() {
    let (_model, pager, _) = setup("gqa-llama3-f32");
    let dir = copy_adapter("r8-mlp", "targets");
    edit_config(&dir, "target_modules", serde_json::json!(["gate_proj", "up_proj"]));
    let msg = register_err(&pager, &dir);
    assert!(msg.contains("target_modules") && msg.contains("down_proj"), "{msg}");
}

#[test]
fn shapes_are_checked_against_the_base_model() {
    // The same adapter against a base of another width is refused, naming the tensor.
    let other = LoadedModel::load(&repo_root().join("tests/fixtures/models/mqa-bf16-sharded")).expect("model");
    let pager = AdapterPager::new(other.config(), PagerConfig::default(), Metrics::new().pager);
    let msg = register_err(&pager, &adapters_dir().join("r4-qv"));
    assert!(msg.contains("lora_A.weight") && msg.contains("adapter_model.safetensors"), "{msg}");
}

#[test]
fn pickled_adapters_are_refused_with_how_to_convert() {
    let (_model, pager, _) = setup("gqa-llama3-f32");
    let dir = copy_adapter("r4-qv", "pickle");
    std::fs::rename(dir.join("adapter_model.safetensors"), dir.join("adapter_model.bin")).expect("rename");
    let msg = register_err(&pager, &dir);
    assert!(msg.contains("adapter_model.bin") && msg.contains("safe_serialization=True"), "{msg}");
}

#[test]
fn a_broken_adapter_fails_only_its_own_requests() {
    let (model, pager, mixed) = setup("gqa-llama3-f32");
    let corrupt = copy_adapter("r4-qv", "corrupt");
    let vanished = copy_adapter("r8-mlp", "vanished");
    pager.register("corrupt", &corrupt).expect("valid at registration");
    pager.register("vanished", &vanished).expect("valid at registration");
    std::fs::write(corrupt.join("adapter_model.safetensors"), b"not safetensors any more").expect("corrupt it");
    std::fs::remove_dir_all(&vanished).expect("remove it");
    for name in ["corrupt", "vanished"] {
        match pager.acquire(name, Duration::from_secs(5)) {
            Err(Error::Submit(SubmitError::AdapterLoad { name: n, .. })) => assert_eq!(n, name),
            other => panic!("{name}: expected a load error, got {other:?}"),
        }
    }
    // Everyone else is unaffected.
    let lease = pager.acquire("r4-qv", Duration::from_secs(5)).expect("healthy adapter");
    let params = SamplingParams { max_tokens: 32, ignore_eos: true, ..Default::default() };
    let out = generate(
        &model,
        &mixed.ids("input_ids", 0),
        params,
        Some(WithAdapter { pager: &pager, lease: &lease }),
        &mut |_| {},
    )
    .expect("generate");
    assert_eq!(out.token_ids, mixed.ids("greedy", 0));
}
