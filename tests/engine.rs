//! The serving engine: continuous batching is invisible in the output, preemption never
//! corrupts, cancellation frees resources within a step, priorities and deadlines hold; and the
//! same mixed-adapter serving on every backend the machine has (the CPU, and a GPU if present).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::repo_root;
use openlora::Error;
use openlora::engine::FinishReason;
use openlora::engine::{EngineConfig, EngineHandle, Event, GenerationRequest, RequestStream, Usage};
use openlora::error::SubmitError;
use openlora::harness::reference::{WithAdapter, generate};
use openlora::metrics::Metrics;
use openlora::model::{KvDType, LoadedModel, PagedKvCache};
use openlora::pager::{AdapterPager, PagerConfig, PoolPlace};
use openlora::sampling::SamplingParams;

const ADAPTERS: [&str; 4] = ["r4-qv", "r8-mlp", "r16-all-rslora", "r64-ko-layer1"];
const WORDS: [&str; 16] = [
    "the", "cat", "computer", "never", "wisdom", "a", "penny", "saved", "is", "life", "of", "Q:", "why", "and", "love",
    "star",
];

fn model() -> Arc<LoadedModel> {
    Arc::new(LoadedModel::load(&repo_root().join("tests/fixtures/models/gqa-llama3-f32")).expect("model"))
}

fn pager(model: &LoadedModel, config: PagerConfig) -> AdapterPager {
    let pager = AdapterPager::new(model.config(), config, Metrics::new().pager);
    for a in ADAPTERS {
        pager.register(a, &repo_root().join("tests/fixtures/adapters/gqa-llama3-f32").join(a)).expect("register");
    }
    pager
}

struct Rng(u64);
impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn random_request(rng: &mut Rng, model: &LoadedModel, i: usize) -> GenerationRequest {
    let words: Vec<&str> = (0..1 + rng.next(30)).map(|_| WORDS[rng.next(WORDS.len())]).collect();
    let prompt_ids = model.tokenizer.encode(&words.join(" ")).expect("encode");
    let adapter = match rng.next(5) {
        4 => None,
        k => Some(ADAPTERS[k].to_string()),
    };
    GenerationRequest {
        id: format!("req-{i}"),
        prompt_ids,
        params: SamplingParams { max_tokens: 1 + rng.next(40), ..Default::default() },
        adapter,
        priority: 0,
        deadline: None,
        logprobs: None,
    }
}

/// An engine over the fixture model with the four fixture adapters.
fn start(model: &Arc<LoadedModel>, config: EngineConfig) -> EngineHandle {
    EngineHandle::start(model.clone(), pager(model, PagerConfig::default()), config, Metrics::new()).expect("engine")
}

/// A base-model request for "the cat" that runs exactly `max_tokens` tokens.
fn plain(model: &LoadedModel, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        id: "plain".into(),
        prompt_ids: model.tokenizer.encode("the cat").expect("encode"),
        params: SamplingParams { max_tokens, ignore_eos: true, ..Default::default() },
        adapter: None,
        priority: 0,
        deadline: None,
        logprobs: None,
    }
}

/// What one request produced through the engine.
struct Outcome {
    tokens: Vec<u32>,
    reason: FinishReason,
    usage: Usage,
}

fn drain(mut stream: RequestStream) -> Outcome {
    let mut tokens = Vec::new();
    loop {
        match stream.next_blocking() {
            Some(Event::Token { id, .. }) if id != u32::MAX => tokens.push(id),
            Some(Event::Token { .. }) => {}
            Some(Event::Done { reason, usage }) => return Outcome { tokens, reason, usage },
            Some(Event::Failed { message, .. }) => panic!("{}: failed: {message}", stream.id),
            None => panic!("{}: stream ended without Done", stream.id),
        }
    }
}

/// The same request run alone through the simple single-sequence path.
fn alone(model: &LoadedModel, pager: &AdapterPager, req: &GenerationRequest) -> Vec<u32> {
    let lease = req.adapter.as_ref().map(|a| pager.acquire(a, Duration::from_secs(10)).expect("lease"));
    let with = lease.as_ref().map(|lease| WithAdapter { pager, lease });
    generate(model, &req.prompt_ids, req.params.clone(), with, &mut |_| {}).expect("generate").token_ids
}

/// The engine's stats once every block is back (or after 5 s): the last step's stats are
/// published just after its requests are told they are done.
fn settled(engine: &EngineHandle) -> openlora::engine::EngineStats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = engine.stats();
        if s.kv_free_blocks == s.kv_total_blocks || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn run_concurrently(engine: &EngineHandle, reqs: &[GenerationRequest]) -> Vec<Outcome> {
    let streams: Vec<RequestStream> = reqs.iter().map(|r| engine.submit(r.clone()).expect("submit")).collect();
    let handles: Vec<_> = streams.into_iter().map(|s| std::thread::spawn(move || drain(s))).collect();
    handles.into_iter().map(|h| h.join().expect("reader")).collect()
}

/// The usage fields as the SDK's README defines them ("Usage: every field"), for a request
/// that runs alone.
#[test]
fn a_request_alone_reports_usage_as_the_sdk_defines_it() {
    let model = model();
    let engine = start(&model, EngineConfig::default());
    let mut req = random_request(&mut Rng(0xA10E), &model, 0);
    req.adapter = Some(ADAPTERS[1].to_string());
    let started = Instant::now();
    let out = &run_concurrently(&engine, std::slice::from_ref(&req))[0];
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let u = &out.usage;
    // Times in whole milliseconds (rounded down): waiting and steps lie within the request's life.
    assert!(u.queue_ms + u.compute_ms <= elapsed_ms, "queue + compute within {elapsed_ms} ms: {u:?}");
    assert!(u.adapter_load_ms <= elapsed_ms, "{u:?}");
    // Once resident, an adapter costs no load; the base model never does.
    let again = &run_concurrently(&engine, std::slice::from_ref(&req))[0];
    assert_eq!(again.usage.adapter_load_ms, 0, "resident: {:?}", again.usage);
    let base = GenerationRequest { adapter: None, ..req.clone() };
    let base = run_concurrently(&engine, &[base])[0].usage.clone();
    assert_eq!((base.adapter_load_ms, base.adapter_contribution_ppm), (0, 0), "the base model alone: {base:?}");
    assert_eq!(u.prompt_tokens as usize, req.prompt_ids.len());
    assert_eq!(u.completion_tokens as usize, out.tokens.len());
    assert!(u.steps >= u.completion_tokens && u.completion_tokens > 0, "a step per generated token: {u:?}");
    assert_eq!(u.batch_share_ppm, u64::from(u.steps) * 1_000_000, "alone, it had every step to itself: {u:?}");
    assert!(u.adapter_contribution_ppm <= 1_000_000);
    assert!(u.adapter_contribution_ppm > 0, "an adapter measurably contributes: {u:?}");
}

#[test]
fn batching_is_invisible_in_greedy_output() {
    let model = model();
    let reference_pager = pager(&model, PagerConfig::default());
    let config = EngineConfig { max_batch_tokens: 96, ..Default::default() };
    let engine = start(&model, config);
    let mut rng = Rng(0x5EED);
    let reqs: Vec<GenerationRequest> = (0..64).map(|i| random_request(&mut rng, &model, i)).collect();
    let outcomes = run_concurrently(&engine, &reqs);
    for (req, out) in reqs.iter().zip(&outcomes) {
        assert_eq!(out.tokens, alone(&model, &reference_pager, req), "{} ({:?})", req.id, req.adapter);
        assert_eq!(out.usage.prompt_tokens as usize, req.prompt_ids.len());
        assert_eq!(out.usage.completion_tokens as usize, out.tokens.len());
        assert!(out.usage.batch_share_ppm <= out.usage.steps as u64 * 1_000_000);
        // Adapters measurably contribute; the base model alone contributes nothing.
        assert_eq!(out.usage.adapter_contribution_ppm > 0, req.adapter.is_some(), "{}", req.id);
        assert!(out.usage.adapter_contribution_ppm < 1_000_000);
    }
    let stats = settled(&engine);
    assert!(stats.max_batch_seqs >= 8, "requests were never batched together: {stats:?}");
    assert_eq!(stats.kv_free_blocks, stats.kv_total_blocks, "KV blocks leaked");
    assert!(engine.pager().active_snapshot().0.iter().all(|(_, pins)| *pins == 0), "adapter pins leaked");
}

#[test]
fn a_kv_pool_too_small_preempts_and_still_completes_correctly() {
    let model = model();
    let reference_pager = pager(&model, PagerConfig::default());
    let block = PagedKvCache::block_bytes(model.config(), KvDType::F32);
    // 12 blocks (192 tokens) for 24 requests of up to ~70 tokens each.
    let config = EngineConfig { kv_cache_bytes: 12 * block, max_batch_tokens: 128, ..Default::default() };
    let engine = start(&model, config);
    let mut rng = Rng(0xB10C);
    let reqs: Vec<GenerationRequest> = (0..24)
        .map(|i| {
            let mut r = random_request(&mut rng, &model, i);
            r.params.max_tokens = 40;
            r.params.ignore_eos = true;
            r
        })
        .collect();
    let outcomes = run_concurrently(&engine, &reqs);
    for (req, out) in reqs.iter().zip(&outcomes) {
        assert_eq!(out.tokens, alone(&model, &reference_pager, req), "{} after preemption", req.id);
        assert_eq!(out.reason, FinishReason::Length);
    }
    let stats = engine.stats();
    assert!(stats.preemptions > 0, "the pool was never short: {stats:?}");
    assert_eq!(stats.kv_free_blocks, stats.kv_total_blocks);
}

/// A windowed model (Mistral, window of 8) through chunked prefill, batching, mixed adapters and
/// preemption: each request's tokens as it gets alone. A chunk's queries must see the earlier
/// chunks' keys only within the window, and a recomputed sequence the same.
#[test]
fn a_sliding_window_survives_chunking_batching_and_preemption() {
    let base = "mistral-window8-f32";
    let model = Arc::new(LoadedModel::load(&repo_root().join("tests/fixtures/models").join(base)).expect("model"));
    let adapters = ["r8-attn", "r4-mlp-rslora"];
    let pager = || {
        let p = AdapterPager::new(model.config(), PagerConfig::default(), Metrics::new().pager);
        for a in adapters {
            p.register(a, &repo_root().join("tests/fixtures/adapters").join(base).join(a)).expect("register");
        }
        p
    };
    let reference = pager();
    let block = PagedKvCache::block_bytes(model.config(), KvDType::F32);
    // 12 blocks (192 tokens) for 16 requests of up to ~62 tokens, 24 tokens a step.
    let config = EngineConfig { kv_cache_bytes: 12 * block, max_batch_tokens: 24, ..Default::default() };
    let engine = EngineHandle::start(model.clone(), pager(), config, Metrics::new()).expect("engine");
    let mut rng = Rng(0x3E7);
    let reqs: Vec<GenerationRequest> = (0..16)
        .map(|i| {
            let mut r = random_request(&mut rng, &model, i);
            r.adapter = [None, Some(adapters[0]), Some(adapters[1])][i % 3].map(str::to_string);
            r.params.max_tokens = 12 + rng.next(20);
            r.params.ignore_eos = true;
            r
        })
        .collect();
    assert!(reqs.iter().filter(|r| r.prompt_ids.len() > 8).count() >= 8, "prompts longer than the window");
    let outcomes = run_concurrently(&engine, &reqs);
    for (req, out) in reqs.iter().zip(&outcomes) {
        assert_eq!(out.tokens, alone(&model, &reference, req), "{} ({:?})", req.id, req.adapter);
    }
    let stats = settled(&engine);
    assert!(stats.preemptions > 0, "the pool was never short: {stats:?}");
    assert_eq!(stats.kv_free_blocks, stats.kv_total_blocks, "KV blocks leaked");
}

fn wait_for_steps(engine: &EngineHandle, target: u64) {
    let t0 = Instant::now();
    while engine.stats().steps < target {
        assert!(t0.elapsed() < Duration::from_secs(20), "engine stopped stepping");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn cancelling_frees_blocks_and_the_adapter_pin_within_one_step() {
    let model = model();
    let engine = start(&model, EngineConfig::default());
    let mut req = random_request(&mut Rng(3), &model, 0);
    req.adapter = Some("r16-all-rslora".into());
    req.params.max_tokens = 200;
    req.params.ignore_eos = true;
    // A second, unrelated request keeps the engine stepping.
    let mut other = random_request(&mut Rng(4), &model, 1);
    other.params.max_tokens = 220;
    other.params.ignore_eos = true;
    other.adapter = None;
    let other = engine.submit(other).expect("submit");
    let mut stream = engine.submit(req).expect("submit");
    match stream.next_blocking() {
        Some(Event::Token { .. }) => {}
        e => panic!("expected a token, got {e:?}"),
    }
    assert!(engine.pager().active_snapshot().0.contains(&("r16-all-rslora".to_string(), 1)));
    let step = engine.stats().steps;
    drop(stream); // the caller goes away
    wait_for_steps(&engine, step + 2);
    let stats = engine.stats();
    assert_eq!(stats.running, 1, "the cancelled request still runs: {stats:?}");
    assert!(engine.pager().active_snapshot().0.contains(&("r16-all-rslora".to_string(), 0)), "pin not released");
    drop(other);
    let t0 = Instant::now();
    while engine.stats().running > 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the second cancellation was never seen");
        std::thread::sleep(Duration::from_millis(1));
    }
    let stats = engine.stats();
    assert_eq!(stats.kv_free_blocks, stats.kv_total_blocks, "blocks not freed: {stats:?}");
}

#[test]
fn priorities_order_admission_and_age_prevents_starvation() {
    let model = model();
    for (age_limit, expect_high_first) in [(Duration::from_secs(60), true), (Duration::ZERO, false)] {
        let config = EngineConfig { max_running: 1, age_limit, ..Default::default() };
        let engine = start(&model, config);
        let mk =
            |id: &str, priority, max_tokens| GenerationRequest { id: id.into(), priority, ..plain(&model, max_tokens) };
        let mut busy = engine.submit(mk("busy", 0, 30)).expect("submit");
        assert!(matches!(busy.next_blocking(), Some(Event::Token { .. })));
        let low = engine.submit(mk("low", 0, 40)).expect("submit");
        let high = engine.submit(mk("high", 9, 40)).expect("submit");
        let low = std::thread::spawn(move || drain(low));
        let high = std::thread::spawn(move || drain(high));
        drain(busy);
        let (low, high) = (low.join().expect("low"), high.join().expect("high"));
        // With one running slot the second admitted waits for the first to finish (40 steps).
        let high_first = high.usage.queue_ms < low.usage.queue_ms;
        assert_eq!(
            high_first, expect_high_first,
            "age limit {age_limit:?}: queue ms high {} low {}",
            high.usage.queue_ms, low.usage.queue_ms
        );
    }
}

#[test]
fn deadlines_and_up_front_rejections() {
    let model = model();
    let engine = start(&model, EngineConfig::default());
    // As many tokens as the context holds, due in 2 ms: far more than any machine computes.
    let most = model.config().max_position_embeddings - plain(&model, 1).prompt_ids.len();
    let base = GenerationRequest { deadline: Some(Instant::now() + Duration::from_millis(2)), ..plain(&model, most) };
    let out = drain(engine.submit(base.clone()).expect("submit"));
    assert_eq!(out.reason, FinishReason::Deadline);
    assert!(out.tokens.len() < most);

    let context = model.config().max_position_embeddings;
    let long = GenerationRequest { prompt_ids: vec![5; context], deadline: None, ..base.clone() };
    assert!(matches!(engine.submit(long), Err(Error::Submit(SubmitError::ContextOverflow { .. }))));
    let unknown = GenerationRequest { adapter: Some("nope".into()), deadline: None, ..base.clone() };
    assert!(matches!(engine.submit(unknown), Err(Error::Submit(SubmitError::UnknownAdapter(_)))));
    let bad = GenerationRequest { params: SamplingParams { top_p: 0.0, ..base.params.clone() }, ..base.clone() };
    assert!(matches!(engine.submit(bad), Err(Error::Submit(SubmitError::InvalidParam { param: "top_p", .. }))));
    let oov = GenerationRequest { prompt_ids: vec![1_000_000], ..base.clone() };
    assert!(matches!(engine.submit(oov), Err(Error::Submit(SubmitError::InvalidParam { .. }))));
}

#[test]
fn a_full_queue_is_refused() {
    let model = model();
    let config = EngineConfig { max_waiting: 2, max_running: 1, ..Default::default() };
    let engine = start(&model, config);
    let req = plain(&model, 100);
    let mut kept = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        match engine.submit(req.clone()) {
            Ok(s) => kept.push(s),
            Err(Error::Submit(SubmitError::QueueFull)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0, "the queue limit was never reached");
}

#[test]
fn requests_wait_for_room_in_a_full_adapter_pool() {
    let model = model();
    // 640 pages of 64 floats: r16-all-rslora fills the pool alone, so requests for the other
    // adapters must wait for its pin to drop (and evict it), not fail.
    let metrics = Metrics::new();
    let pool = PagerConfig { active_pool_bytes: 640 * 64 * 4, ..PagerConfig::default() };
    let constrained = AdapterPager::new(model.config(), pool, metrics.pager.clone());
    for a in ADAPTERS {
        constrained.register(a, &repo_root().join("tests/fixtures/adapters/gqa-llama3-f32").join(a)).expect("register");
    }
    let engine =
        EngineHandle::start(model.clone(), constrained, EngineConfig::default(), Metrics::new()).expect("engine");
    let reference = pager(&model, PagerConfig::default());
    let reqs: Vec<GenerationRequest> = ["r16-all-rslora", "r8-mlp", "r64-ko-layer1", "r16-all-rslora"]
        .iter()
        .enumerate()
        .map(|(i, a)| GenerationRequest { id: format!("w{i}"), adapter: Some(a.to_string()), ..plain(&model, 24) })
        .collect();
    let outcomes = run_concurrently(&engine, &reqs);
    for (req, out) in reqs.iter().zip(&outcomes) {
        assert_eq!(out.reason, FinishReason::Length, "{}", req.id);
        assert_eq!(out.tokens, alone(&model, &reference, req), "{}", req.id);
    }
    assert!(metrics.pager.evictions.with_label_values(&["active"]).get() >= 1, "the pool never had to make room");
}

/// The backends this machine has: the CPU always, and `cuda:0` when the `cuda` feature is built
/// and a GPU answers (`OPENLORA_REQUIRE_GPU=1`, as the GPU check sets, makes its absence a failure).
fn backends() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut found = vec!["cpu"];
    #[cfg(feature = "cuda")]
    match openlora::device::probe_cuda(0) {
        Ok(_) => found.push("cuda:0"),
        Err(e) => assert!(std::env::var_os("OPENLORA_REQUIRE_GPU").is_none(), "a GPU was required: {e}"),
    }
    found
}

/// An engine on `device` whose adapter pool holds `pool_values` values (device bytes on a GPU).
fn start_on(device: &str, model: &Arc<LoadedModel>, pool_values: usize) -> EngineHandle {
    let pool = if device == "cpu" { PoolPlace::Host } else { PoolPlace::Device };
    let config = PagerConfig { active_pool_bytes: pool_values * pool.value_bytes(), pool, ..PagerConfig::default() };
    let pager = pager(model, config);
    let engine = EngineConfig { max_batch_tokens: 96, ..Default::default() };
    #[cfg(feature = "cuda")]
    if device != "cpu" {
        let gpu = openlora::gpu::backend::GpuBackend::open(0, model, &pager, Some(256 << 20), 16).expect("GPU backend");
        return EngineHandle::start_on(Box::new(gpu), model.clone(), pager, engine, Metrics::new()).expect("engine");
    }
    EngineHandle::start(model.clone(), pager, engine, Metrics::new()).expect("engine")
}

#[test]
fn every_backend_serves_mixed_adapters_as_the_cpu_reference_does() {
    let model = model();
    let reference = pager(&model, PagerConfig::default());
    let mut rng = Rng(0xBAC0);
    let reqs: Vec<GenerationRequest> = (0..24).map(|i| random_request(&mut rng, &model, i)).collect();
    let want: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&model, &reference, r)).collect();
    let mut cpu_ppm: Vec<u32> = Vec::new();
    for device in backends() {
        // A roomy adapter pool, and one that holds r16-all-rslora only by itself: adapters are
        // evicted and new ones placed in reused pages while others run.
        for pool_values in [1 << 22, 640 * 64] {
            let engine = start_on(device, &model, pool_values);
            let outcomes = run_concurrently(&engine, &reqs);
            let mut first_agree = 0;
            for (i, (req, out)) in reqs.iter().zip(&outcomes).enumerate() {
                let at = format!("{device}, pool {pool_values}: {} ({:?})", req.id, req.adapter);
                assert_eq!(out.usage.completion_tokens as usize, out.tokens.len(), "{at}");
                assert_eq!(out.usage.adapter_contribution_ppm > 0, req.adapter.is_some(), "{at}");
                first_agree += usize::from(out.tokens.first() == want[i].first());
                if device == "cpu" {
                    assert_eq!(out.tokens, want[i], "{at}");
                    cpu_ppm.push(out.usage.adapter_contribution_ppm);
                } else if out.tokens == want[i] {
                    // Same tokens, so the same rows measured: bf16 against f32 sums.
                    let (g, c) = (out.usage.adapter_contribution_ppm as f64, cpu_ppm[i] as f64);
                    assert!((g - c).abs() <= 0.03 * c + 50.0, "{at}: contribution {g} ppm, the CPU's {c}");
                }
            }
            // A GPU computes in bf16: greedy choices may part from the f32 reference's late in a
            // sequence, rarely on the first token.
            assert!(first_agree * 10 >= reqs.len() * 9, "{device}: first tokens agree on {first_agree}/{}", reqs.len());
            let stats = settled(&engine);
            assert_eq!(stats.kv_free_blocks, stats.kv_total_blocks, "{device}: KV blocks leaked");
            assert!(engine.pager().active_snapshot().0.iter().all(|(_, pins)| *pins == 0), "{device}: pins leaked");
        }
    }
}

/// On a device other than the CPU, what the CPU test above shows for the CPU: batching, chunked
/// prefill and preemption are invisible in greedy output. The reference is the same device
/// running each request alone; the CUDA stand-in's arithmetic does not depend on the batch, so
/// there the tokens must be identical (a GPU's cuBLAS may pick other kernels for other batch
/// sizes: there most must agree).
#[test]
fn on_every_device_batching_chunking_and_preemption_are_invisible() {
    let model = model();
    let mut rng = Rng(0xC4A5);
    let reqs: Vec<GenerationRequest> = (0..16)
        .map(|i| {
            let mut r = random_request(&mut rng, &model, i);
            r.params.max_tokens = 12 + rng.next(20);
            r.params.ignore_eos = true;
            r
        })
        .collect();
    for device in backends().into_iter().filter(|d| *d != "cpu") {
        #[cfg(feature = "cuda")]
        {
            let gpu_engine = |kv_blocks: Option<usize>, max_batch_tokens: usize| {
                let config =
                    PagerConfig { active_pool_bytes: 2 << 22, pool: PoolPlace::Device, ..PagerConfig::default() };
                let pager = pager(&model, config);
                let cfg = model.config();
                let budget = kv_blocks.map(|blocks| {
                    openlora::gpu::lora::GpuAdapters::device_bytes(
                        cfg.num_layers,
                        pager.pool_pages(),
                        pager.page_elems(),
                        16,
                        pager.pool_pages(),
                    ) + blocks * openlora::gpu::model::GpuKv::block_bytes(cfg)
                });
                let gpu = openlora::gpu::backend::GpuBackend::open(0, &model, &pager, budget.or(Some(256 << 20)), 16)
                    .expect("GPU backend");
                let engine = EngineConfig { max_batch_tokens, ..Default::default() };
                EngineHandle::start_on(Box::new(gpu), model.clone(), pager, engine, Metrics::new()).expect("engine")
            };
            let alone_engine = gpu_engine(None, 512);
            let want: Vec<Vec<u32>> =
                reqs.iter().map(|r| drain(alone_engine.submit(r.clone()).expect("submit")).tokens).collect();
            // 12 blocks (192 tokens) for 16 requests of up to ~62 tokens, 24 tokens a step.
            let engine = gpu_engine(Some(12), 24);
            let outcomes = run_concurrently(&engine, &reqs);
            let standin = engine.device().contains("stand-in");
            let mut same = 0;
            for (i, (req, out)) in reqs.iter().zip(&outcomes).enumerate() {
                assert_eq!(out.reason, FinishReason::Length, "{device}: {}", req.id);
                assert_eq!(out.tokens.len(), req.params.max_tokens, "{device}: {}", req.id);
                same += usize::from(out.tokens == want[i]);
            }
            let stats = settled(&engine);
            assert!(stats.preemptions > 0, "{device}: the pool was never short: {stats:?}");
            assert_eq!(stats.kv_free_blocks, stats.kv_total_blocks, "{device}: KV blocks leaked");
            if standin {
                assert_eq!(same, reqs.len(), "{device}: batched output differs from the same device alone");
            } else {
                assert!(same * 10 >= reqs.len() * 8, "{device}: {same}/{} requests as alone", reqs.len());
            }
        }
    }
}

/// A device that broke mid-run: every step fails, and it says it can run no more.
struct BrokenDevice {
    kv: openlora::model::BlockPool,
}

impl openlora::engine::backend::Backend for BrokenDevice {
    fn describe(&self) -> String {
        "broken".into()
    }
    fn kv(&self) -> &openlora::model::BlockPool {
        &self.kv
    }
    fn kv_mut(&mut self) -> &mut openlora::model::BlockPool {
        &mut self.kv
    }
    fn step(
        &mut self,
        _: &mut [openlora::model::SeqBatch<'_>],
        _: &[openlora::engine::backend::Pick],
        _: &AdapterPager,
    ) -> openlora::Result<openlora::engine::backend::StepOutput> {
        Err(Error::device("cuda: CUDA_ERROR_ILLEGAL_ADDRESS"))
    }
    fn fault(&self) -> Option<String> {
        Some("broken: cuda: CUDA_ERROR_ILLEGAL_ADDRESS".into())
    }
}

#[test]
fn a_failed_device_fails_its_requests_frees_their_blocks_and_reports_the_fault() {
    let model = model();
    let broken = Box::new(BrokenDevice { kv: openlora::model::BlockPool::new(64) });
    let engine = EngineHandle::start_on(
        broken,
        model.clone(),
        pager(&model, PagerConfig::default()),
        EngineConfig::default(),
        Metrics::new(),
    )
    .expect("engine");
    assert_eq!(engine.device(), "broken");
    let mut stream = engine.submit(plain(&model, 4)).expect("submit");
    match stream.next_blocking() {
        Some(Event::Failed { message, .. }) => assert!(message.contains("ILLEGAL_ADDRESS"), "{message}"),
        other => panic!("expected the request to fail, got {other:?}"),
    }
    let stats = settled(&engine);
    assert_eq!(stats.kv_free_blocks, stats.kv_total_blocks, "the failed request's blocks are back");
    assert!(stats.device_fault.is_some_and(|f| f.contains("ILLEGAL_ADDRESS")), "the fault is reported");
}
