//! Engine throughput on the fixture model: 32 requests over 16 adapters, all at once
//! (continuous batching) versus the same requests one at a time, in one run.

use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use openlora::engine::{EngineConfig, EngineHandle, Event, GenerationRequest, RequestStream};
use openlora::metrics::Metrics;
use openlora::model::LoadedModel;
use openlora::pager::{AdapterPager, PagerConfig};
use openlora::sampling::SamplingParams;

const REQUESTS: usize = 32;
const ADAPTERS: usize = 16;
const NEW_TOKENS: usize = 32;
const FOLDERS: [&str; 4] = ["r4-qv", "r8-mlp", "r16-all-rslora", "r64-ko-layer1"];

fn drain(mut s: RequestStream) -> usize {
    let mut n = 0;
    while let Some(e) = s.next_blocking() {
        match e {
            Event::Token { .. } => n += 1,
            Event::Done { .. } => break,
            Event::Failed { message, .. } => panic!("{message}"),
        }
    }
    n
}

fn engine_throughput(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let model = Arc::new(LoadedModel::load(&root.join("models/gqa-llama3-f32")).expect("model"));
    let pager = AdapterPager::new(model.config(), PagerConfig::default(), Metrics::new().pager);
    for i in 0..ADAPTERS {
        let dir = root.join("adapters/gqa-llama3-f32").join(FOLDERS[i % FOLDERS.len()]);
        pager.register(&format!("a{i}"), &dir).expect("register");
    }
    let engine = EngineHandle::start(model.clone(), pager, EngineConfig::default(), Metrics::new()).expect("engine");
    let requests: Vec<GenerationRequest> = (0..REQUESTS)
        .map(|i| GenerationRequest {
            id: format!("r{i}"),
            prompt_ids: model.tokenizer.encode(&format!("Request {i}: the meaning of life is")).expect("encode"),
            params: SamplingParams { max_tokens: NEW_TOKENS, ignore_eos: true, ..Default::default() },
            adapter: Some(format!("a{}", i % ADAPTERS)),
            priority: 0,
            deadline: None,
            logprobs: None,
        })
        .collect();
    let mut group = c.benchmark_group("engine_32_requests_16_adapters");
    group.sample_size(10).throughput(Throughput::Elements((REQUESTS * NEW_TOKENS) as u64));
    group.bench_function("one_at_a_time", |b| {
        b.iter(|| requests.iter().map(|r| drain(engine.submit(r.clone()).expect("submit"))).sum::<usize>())
    });
    group.bench_function("all_at_once", |b| {
        b.iter(|| {
            let streams: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).expect("submit")).collect();
            streams.into_iter().map(drain).sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(benches, engine_throughput);
criterion_main!(benches);
