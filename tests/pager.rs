//! The adapter pager under load: 1,000 registered adapters, an active pool that fits 16,
//! many concurrent users, correct outputs throughout and no pinned adapter ever evicted.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::Duration;

use candle_core::DType;
use common::repo_root;
use openlora::harness::random::RandomAdapter;
use openlora::metrics::Metrics;
use openlora::model::{LoadedModel, LogitRows, ModelConfig, Proj, SeqBatch, SeqKv};
use openlora::pager::{AdapterLease, AdapterPager, PagerConfig, PoolPlace};

const ADAPTERS: usize = 1000;
const RANKS: [usize; 3] = [2, 4, 8];

fn base_model() -> LoadedModel {
    LoadedModel::load(&repo_root().join("tests/fixtures/models/gqa-llama3-f32")).expect("base model")
}

/// Writes a real PEFT folder: rank `r` on q_proj and v_proj of every layer, values from `seed`.
fn write_adapter(dir: &Path, cfg: &ModelConfig, r: usize, seed: u64) {
    let spec = RandomAdapter { rank: r, targets: &[Proj::Q, Proj::V], scale: 1.0, seed, dtype: DType::F32 };
    openlora::harness::random::write(dir, cfg, &spec).expect("adapter folder");
}

/// The 1,000 adapter folders, written once per test process.
fn adapter_farm(cfg: &ModelConfig) -> PathBuf {
    static FARM: OnceLock<PathBuf> = OnceLock::new();
    FARM.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("openlora-farm-{}", std::process::id()));
        for i in 0..ADAPTERS {
            write_adapter(&root.join(format!("a{i:04}")), cfg, RANKS[i % RANKS.len()], i as u64);
        }
        root
    })
    .clone()
}

fn logits_with(model: &LoadedModel, pager: &AdapterPager, lease: &AdapterLease, prompt: &[u32]) -> Vec<f32> {
    let pool = pager.pool();
    let mut cache = model.llama().expect("CPU weights").kv_cache_for(1);
    let mut kv = SeqKv::default();
    let seq = SeqBatch { tokens: prompt, kv: &mut kv, adapter: Some(lease.placed()) };
    let out = model
        .llama()
        .expect("CPU weights")
        .forward(&mut cache, &mut [seq], LogitRows::Last, Some(pool.view()))
        .expect("forward");
    out.flatten_all().expect("flat").to_vec1().expect("logits")
}

/// Pool bytes that hold exactly `n` of the largest farm adapters (pages are `hidden` floats).
fn pool_for(cfg: &ModelConfig, n: usize) -> usize {
    let max_r = *RANKS.iter().max().expect("ranks");
    // q: A and Bᵀ rows of one page each; v: the same (its 32-wide Bᵀ rows take a page each).
    let pages_per_adapter = cfg.num_layers * 2 * 2 * max_r;
    n * pages_per_adapter * cfg.hidden_size * 4
}

#[test]
fn thousand_adapters_sixteen_slots_many_users() {
    let model = Arc::new(base_model());
    let cfg = model.config().clone();
    let farm = adapter_farm(&cfg);
    let metrics = Metrics::new();
    let config = PagerConfig {
        host_cache_bytes: 48 * 4 * 3584,
        active_pool_bytes: pool_for(&cfg, 16),
        ..PagerConfig::default()
    };
    let pager = AdapterPager::new(&cfg, config, metrics.pager.clone());
    // The oracle: the same adapters in a pool large enough never to evict.
    let oracle = AdapterPager::new(&cfg, PagerConfig::default(), Metrics::new().pager);
    for i in 0..ADAPTERS {
        let name = format!("a{i:04}");
        pager.register(&name, &farm.join(&name)).expect("register");
        oracle.register(&name, &farm.join(&name)).expect("register");
    }
    assert_eq!(pager.names().len(), ADAPTERS);
    let prompt = model.tokenizer.encode("The computer is a").expect("encode");
    let expected: Arc<Mutex<HashMap<String, Vec<f32>>>> = Arc::default();

    const USERS: usize = 12;
    const REQUESTS: usize = 40;
    let threads: Vec<_> = (0..USERS)
        .map(|u| {
            let (model, pager, oracle, expected, prompt) =
                (model.clone(), pager.clone(), oracle.clone(), expected.clone(), prompt.clone());
            std::thread::spawn(move || {
                let mut s = (u as u64 + 1).wrapping_mul(0x2545F4914F6CDD1D);
                let mut next = move || {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 11) as f64 / (1u64 << 53) as f64
                };
                for _ in 0..REQUESTS {
                    // Power-law popularity: a few adapters are hot, most are cold.
                    let i = ((ADAPTERS as f64) * next().powi(3)) as usize;
                    let name = format!("a{i:04}");
                    pager.prefetch(&format!("a{:04}", ((ADAPTERS as f64) * next().powi(3)) as usize));
                    let lease = pager.acquire(&name, Duration::from_secs(60)).expect("acquire");
                    std::thread::sleep(Duration::from_micros((next() * 2000.0) as u64));
                    let got = logits_with(&model, &pager, &lease, &prompt);
                    let (active, _) = pager.active_snapshot();
                    assert!(
                        active.iter().any(|(n, pins)| *n == name && *pins >= 1),
                        "{name} is in use but not pinned in the active pool"
                    );
                    let want = {
                        let cached = expected.lock().expect("lock").get(&name).cloned();
                        match cached {
                            Some(w) => w,
                            None => {
                                let l = oracle.acquire(&name, Duration::from_secs(60)).expect("oracle acquire");
                                let w = logits_with(&model, &oracle, &l, &prompt);
                                expected.lock().expect("lock").insert(name.clone(), w.clone());
                                w
                            }
                        }
                    };
                    let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(d <= 1e-6, "{name}: output differs from the oracle by {d}");
                    drop(lease);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("user thread");
    }
    let (active, free) = pager.active_snapshot();
    assert!(active.iter().all(|(_, pins)| *pins == 0), "leases leaked: {active:?}");
    let m = &metrics.pager;
    let evicted = m.evictions.with_label_values(&["active"]).get();
    println!(
        "active hits {} misses {}, host hits {} misses {}, evictions active {} host {}, free pages {free}",
        m.hits.with_label_values(&["active"]).get(),
        m.misses.with_label_values(&["active"]).get(),
        m.hits.with_label_values(&["host"]).get(),
        m.misses.with_label_values(&["host"]).get(),
        evicted,
        m.evictions.with_label_values(&["host"]).get(),
    );
    assert!(evicted > 0, "the pool was never under pressure");
    assert!(metrics.render().contains("openlora_adapter_resident_bytes{tier=\"active\"}"));
}

#[test]
fn concurrent_loads_of_one_adapter_are_coalesced() {
    let model = base_model();
    let cfg = model.config().clone();
    let farm = adapter_farm(&cfg);
    let metrics = Metrics::new();
    let pager = AdapterPager::new(&cfg, PagerConfig::default(), metrics.pager.clone());
    pager.register("hot", &farm.join("a0007")).expect("register");
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (pager, barrier) = (pager.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                pager.acquire("hot", Duration::from_secs(10)).expect("acquire")
            })
        })
        .collect();
    let leases: Vec<_> = threads.into_iter().map(|t| t.join().expect("thread")).collect();
    assert_eq!(
        metrics.pager.misses.with_label_values(&["host"]).get(),
        1,
        "the adapter was read from disk more than once"
    );
    let (active, _) = pager.active_snapshot();
    assert_eq!(active, vec![("hot".to_string(), 8)]);
    drop(leases);
    assert_eq!(pager.active_snapshot().0, vec![("hot".to_string(), 0)]);
}

#[test]
fn prefetch_warms_the_host_tier() {
    let model = base_model();
    let cfg = model.config().clone();
    let farm = adapter_farm(&cfg);
    let metrics = Metrics::new();
    let pager = AdapterPager::new(&cfg, PagerConfig::default(), metrics.pager.clone());
    pager.register("cold", &farm.join("a0123")).expect("register");
    pager.prefetch("cold");
    for _ in 0..500 {
        if pager.host_snapshot() == vec!["cold".to_string()] {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(pager.host_snapshot(), vec!["cold".to_string()]);
    let _lease = pager.acquire("cold", Duration::from_secs(5)).expect("acquire");
    assert_eq!(metrics.pager.hits.with_label_values(&["host"]).get(), 1, "acquire did not find the prefetched copy");
}

#[test]
fn a_pool_full_of_pinned_adapters_makes_callers_wait_not_fail() {
    let model = base_model();
    let cfg = model.config().clone();
    let farm = adapter_farm(&cfg);
    let config = PagerConfig { active_pool_bytes: pool_for(&cfg, 1), ..PagerConfig::default() };
    let pager = AdapterPager::new(&cfg, config, Metrics::new().pager);
    pager.register("first", &farm.join("a0002")).expect("register"); // rank 8: fills the pool
    pager.register("second", &farm.join("a0005")).expect("register");
    let held = pager.acquire("first", Duration::from_secs(5)).expect("acquire");
    assert!(matches!(pager.try_acquire("second"), Ok(openlora::pager::Acquire::Later)));
    let waiter = {
        let pager = pager.clone();
        std::thread::spawn(move || pager.acquire("second", Duration::from_secs(10)).map(|l| l.name().to_string()))
    };
    std::thread::sleep(Duration::from_millis(100));
    drop(held);
    assert_eq!(waiter.join().expect("thread").expect("second acquired once first was released"), "second");
    // Deleting an adapter in use lets its user finish; the pages are freed after.
    let lease = pager.acquire("second", Duration::from_secs(5)).expect("acquire");
    assert!(pager.unregister("second"));
    assert_eq!(pager.active_snapshot().0, vec![("second".to_string(), 1)]);
    drop(lease);
    assert!(pager.active_snapshot().0.is_empty());
}

/// For a GPU the pager keeps no f32 copy of its pool: a placement holds the host tier's own
/// weights, and the host tier does not drop weights a placement still holds (that would free
/// nothing while hiding them from its count).
#[test]
fn a_device_pool_holds_weights_only_through_the_host_tier() {
    let model = base_model();
    let cfg = model.config();
    let root = std::env::temp_dir().join(format!("openlora-device-pool-{}", std::process::id()));
    let config = PagerConfig { host_cache_bytes: 1, pool: PoolPlace::Device, ..PagerConfig::default() };
    let pager = AdapterPager::new(cfg, config, Metrics::new().pager);
    assert_eq!(pager.pool().host_bytes(), 0, "no host copy of a device pool");
    for (i, name) in ["d0", "d1", "d2"].iter().enumerate() {
        write_adapter(&root.join(name), cfg, 8, 100 + i as u64);
        pager.register(name, &root.join(name)).expect("register");
    }
    let d0 = pager.acquire("d0", Duration::from_secs(10)).expect("d0");
    let d1 = pager.acquire("d1", Duration::from_secs(10)).expect("d1");
    assert!(d0.resident().source().is_some() && d1.resident().source().is_some());
    let mut host = pager.host_snapshot();
    host.sort();
    assert_eq!(host, ["d0", "d1"], "adapters on the device stay counted in the host tier");
    assert_eq!(pager.pool().host_bytes(), 0);
}

/// The engine's way in: an adapter on disk is read by the background loader, never on the
/// caller's thread; the caller hears `Loading` until it is in memory, and a version whose load
/// failed is that error (not loaded again and again).
#[test]
fn adapters_on_disk_load_in_the_background_and_failures_are_remembered() {
    use openlora::pager::Acquire;
    let model = base_model();
    let cfg = model.config().clone();
    let farm = adapter_farm(&cfg);
    let pager = AdapterPager::new(&cfg, PagerConfig::default(), Metrics::new().pager);
    pager.register("cold", &farm.join("a0003")).expect("register");
    let manifest = pager.manifest("cold").expect("manifest");
    assert!(matches!(pager.try_acquire_loaded("cold", &manifest), Ok(Acquire::Loading)));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let lease = loop {
        match pager.try_acquire_loaded("cold", &manifest) {
            Ok(Acquire::Ready(lease)) => break lease,
            Ok(Acquire::Loading) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2))
            }
            other => panic!("not loaded in the background: {:?}", other.err()),
        }
    };
    assert_eq!(lease.name(), "cold");

    let broken = std::env::temp_dir().join(format!("openlora-broken-adapter-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&broken);
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(farm.join("a0004").join(f), broken.join(f)).unwrap();
    }
    pager.register("broken", &broken).expect("register");
    std::fs::write(broken.join("adapter_model.safetensors"), b"\0\0\0\0").unwrap();
    let manifest = pager.manifest("broken").expect("manifest");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match pager.try_acquire_loaded("broken", &manifest) {
            Err(e) => {
                assert!(e.to_string().contains("failed to load"), "{e}");
                break;
            }
            Ok(Acquire::Loading) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2))
            }
            _ => panic!("a broken adapter must fail"),
        }
    }
    assert!(pager.try_acquire_loaded("broken", &manifest).is_err(), "the failure is remembered");
    let _ = std::fs::remove_dir_all(&broken);
}
