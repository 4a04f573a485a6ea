//! One decode step of 32 rows on a model of realistic width (random weights), four ways in
//! one run: base only; one adapter for every row; 32 different rank-16 adapters on q/k/v/o,
//! read from an f32 pool and from a bf16 pool (what serving bf16 weights uses).

use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use openlora::harness::random::RandomAdapter;
use openlora::metrics::Metrics;
use openlora::model::{AllocStatus, KvDType, LogitRows, ModelConfig, PagedKvCache, Proj, RopeScaling, SeqBatch, SeqKv};
use openlora::pager::{AdapterLease, AdapterPager, PagerConfig, PoolPlace};

const ROWS: usize = 32;
const RANK: usize = 16;
const CONTEXT: usize = 16;

/// Full size under `cargo bench`; a narrow model when criterion only smoke-tests the bench.
fn config() -> ModelConfig {
    let benching = std::env::args().any(|a| a == "--bench");
    let (hidden, inter, layers) = if benching { (2048, 5632, 2) } else { (256, 512, 1) };
    ModelConfig {
        model_type: "llama".into(),
        family: openlora::shape::Family::Llama,
        layer_windows: vec![None; layers],
        rope_local_theta: None,
        query_pre_attn_scalar: None,
        final_logit_softcapping: None,
        vocab_size: 1024,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: hidden / 128,
        num_kv_heads: (hidden / 128 / 4).max(1),
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        dtype: None,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn write_adapter(dir: &Path, cfg: &ModelConfig, seed: u64) {
    let targets = [Proj::Q, Proj::K, Proj::V, Proj::O];
    let spec = RandomAdapter { rank: RANK, targets: &targets, scale: 1.0, seed, dtype: DType::F32 };
    openlora::harness::random::write(dir, cfg, &spec).expect("adapter folder");
}

fn decode_step(c: &mut Criterion) {
    let cfg = config();
    let model = openlora::harness::random::llama(&cfg, &Device::Cpu).expect("model");
    let root = std::env::temp_dir().join(format!("openlora-bench-adapters-{}-{}", cfg.hidden_size, std::process::id()));
    let pager = |pool: PoolPlace| {
        let config = PagerConfig { active_pool_bytes: 1 << 30, host_cache_bytes: 1 << 30, pool, ..Default::default() };
        AdapterPager::new(&cfg, config, Metrics::new().pager)
    };
    let pagers = [pager(PoolPlace::Host), pager(PoolPlace::HostBf16)];
    for i in 0..ROWS {
        let dir = root.join(format!("a{i}"));
        write_adapter(&dir, &cfg, i as u64);
        for p in &pagers {
            p.register(&format!("a{i}"), &dir).expect("register");
        }
    }
    let leases: Vec<Vec<AdapterLease>> = pagers
        .iter()
        .map(|p| (0..ROWS).map(|i| p.acquire(&format!("a{i}"), Duration::from_secs(60)).expect("acquire")).collect())
        .collect();
    // Every row has CONTEXT tokens in its cache already (prefilled without adapters: the
    // benchmark times the decode step only).
    let prompts: Vec<Vec<u32>> =
        (0..ROWS).map(|r| (0..CONTEXT as u32).map(|t| (r as u32 * 31 + t * 7) % 1000).collect()).collect();
    let mut cache = PagedKvCache::for_sequences(&cfg, ROWS, CONTEXT + 1, KvDType::F32);
    let mut caches: Vec<SeqKv> = (0..ROWS).map(|_| SeqKv::default()).collect();
    {
        let mut batch: Vec<SeqBatch<'_>> =
            prompts.iter().zip(caches.iter_mut()).map(|(p, kv)| SeqBatch::base(p, kv)).collect();
        model.forward(&mut cache, &mut batch, LogitRows::Last, None).expect("prefill");
    }
    // Blocks for the decoded token, so every iteration reuses them.
    for kv in &mut caches {
        assert_eq!(cache.reserve(kv, 1), AllocStatus::Ok);
    }
    let next: Vec<u32> = (0..ROWS as u32).map(|r| r + 5).collect();
    let mut group = c.benchmark_group(format!("decode_step_{ROWS}_rows_hidden_{}", cfg.hidden_size));
    group.sample_size(10).measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_secs(2));
    // (name, pool, the adapter of row r)
    let cases: [(&str, usize, Box<dyn Fn(usize) -> Option<usize>>); 4] = [
        ("base_only", 0, Box::new(|_| None)),
        ("one_adapter_all_rows", 0, Box::new(|_| Some(0))),
        ("32_distinct_rank16_qkvo", 0, Box::new(Some)),
        ("32_distinct_rank16_qkvo_bf16_pool", 1, Box::new(Some)),
    ];
    for (name, p, which) in cases {
        group.bench_function(name, |b| {
            b.iter_batched(
                || caches.clone(),
                |mut kvs| {
                    let pool = pagers[p].pool();
                    let mut batch: Vec<SeqBatch<'_>> = kvs
                        .iter_mut()
                        .enumerate()
                        .map(|(r, kv)| SeqBatch {
                            tokens: &next[r..r + 1],
                            kv,
                            adapter: which(r).map(|a| leases[p][a].placed()),
                        })
                        .collect();
                    model.forward(&mut cache, &mut batch, LogitRows::Last, Some(pool.view())).expect("decode step")
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
    drop(leases);
    let _ = std::fs::remove_dir_all(root);
}

criterion_group!(benches, decode_step);
criterion_main!(benches);
