//! Single-sequence decode speed (tokens/s) on the fixture model and the embedded default.

use std::path::Path;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use openlora::model::{AllocStatus, LoadedModel, LogitRows, SeqBatch, SeqKv};
use openlora::sampling::argmax;

const DECODE_TOKENS: usize = 32;

fn bench_model(c: &mut Criterion, name: &str, folder: &Path) {
    let model = LoadedModel::load(folder).expect("model loads");
    let prompt = model.tokenizer.encode("The meaning of life is").expect("encode");
    let mut cache = model.llama().expect("CPU weights").kv_cache_for(1);
    let mut kv = SeqKv::default();
    let logits = model
        .llama()
        .expect("CPU weights")
        .forward(&mut cache, &mut [SeqBatch::base(&prompt, &mut kv)], LogitRows::Last, None)
        .expect("prefill");
    // Blocks for every token the benchmark decodes, so each iteration reuses them.
    assert_eq!(cache.reserve(&mut kv, DECODE_TOKENS), AllocStatus::Ok);
    let first = argmax(&logits.squeeze(0).expect("row").to_vec1::<f32>().expect("logits"));
    let mut group = c.benchmark_group("decode_single_sequence");
    group.throughput(Throughput::Elements(DECODE_TOKENS as u64));
    group.bench_function(name, |b| {
        b.iter_batched(
            || kv.clone(),
            |mut kv| {
                let mut next = first;
                for _ in 0..DECODE_TOKENS {
                    let logits = model
                        .llama()
                        .expect("CPU weights")
                        .forward(&mut cache, &mut [SeqBatch::base(&[next], &mut kv)], LogitRows::Last, None)
                        .expect("decode step");
                    next = argmax(&logits.squeeze(0).expect("row").to_vec1::<f32>().expect("logits"));
                }
                next
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn decode(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    bench_model(c, "fixture_gqa_llama3_f32", &root.join("tests/fixtures/models/gqa-llama3-f32"));
    let default = openlora::embedded::default_model_dir().expect("embedded model");
    bench_model(c, "embedded_default", &default);
}

criterion_group!(benches, decode);
criterion_main!(benches);
