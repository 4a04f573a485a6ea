//! One projection `y = x · Wᵀ` of a 1024-wide model (a 4096 × 1024 weight), at decode batch 1
//! and 16 and a 256-token prefill, side by side in one run: candle-core's f32 matmul (the CPU path before weights were
//! kept in their stored dtype) and openlora's GEMM on an f32, a bf16, an f16 and an int8 weight
//! (and a bf16 weight meeting its input rounded to bf16), on every instruction set this CPU has. Throughput is in weight bytes read per second.
//! Beside them, where the Debian packages are installed (`libdnnl2`, `libopenblas0-pthread`), the
//! GEMM libraries the issue named as candidates, loaded at run time: oneDNN's
//! `dnnl_gemm_bf16bf16f32` (the same bf16 × bf16 → f32 product) and OpenBLAS's `cblas_sgemm`.

use candle_core::{Device, Tensor};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use openlora_kernels::floats::f32_to_bf16;
use openlora_kernels::gemm::{Weight, WeightData, matmul_t_on};
use openlora_kernels::simd::{self, Isa};

#[path = "gemm/libs.rs"]
mod libs;

fn values(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919 % 2003) as f32 / 1001.0 - 1.0) * 0.05).collect()
}

fn gemm(c: &mut Criterion) {
    let benching = std::env::args().any(|a| a == "--bench");
    let (n, k) = if benching { (4096, 1024) } else { (64, 32) };
    let wf = values(n * k);
    let f32w = Weight::new(n, k, WeightData::F32(wf.clone().into())).expect("shape");
    let bf16w = Weight::new(n, k, WeightData::Bf16(wf.iter().map(|&v| f32_to_bf16(v)).collect())).expect("shape");
    let bf16x = bf16w.clone().with_bf16_inputs(true);
    let int8w = Weight::quantize_int8(n, k, &wf).expect("shape");
    let f16w = Weight::new(n, k, WeightData::F16(wf.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect()))
        .expect("shape");
    let dev = Device::Cpu;
    let wt = Tensor::from_vec(wf, (n, k), &dev).expect("tensor").t().expect("t");
    for m in [1usize, 16, 256] {
        let x = values(m * k);
        let xt = Tensor::from_vec(x.clone(), (m, k), &dev).expect("tensor");
        let mut y = vec![0f32; m * n];
        let mut g = c.benchmark_group(format!("gemm_m{m}"));
        g.throughput(Throughput::Bytes((n * k * 4) as u64));
        g.bench_function("candle_f32", |b| b.iter(|| xt.matmul(&wt).expect("matmul")));
        for isa in Isa::ALL.into_iter().filter(|&i| simd::available(i) && i != Isa::Scalar) {
            for (name, w) in
                [("f32", &f32w), ("bf16", &bf16w), ("bf16_x_bf16", &bf16x), ("f16", &f16w), ("int8", &int8w)]
            {
                g.throughput(Throughput::Bytes(w.bytes() as u64));
                g.bench_function(format!("{}_{name}", isa.name()), |b| b.iter(|| matmul_t_on(isa, &x, m, w, &mut y)));
            }
        }
        let x16: Vec<u16> = x.iter().map(|&v| f32_to_bf16(v)).collect();
        if let (Some(dnnl), WeightData::Bf16(w16)) = (libs::OneDnn::load(), bf16w.data()) {
            let call = |y: &mut [f32]| dnnl.gemm_bf16_t(&x16, m, w16, n, k, y);
            time_library(&mut g, "onednn_bf16_x_bf16", (&x, m, &bf16x), call);
        }
        if let (Some(blas), WeightData::F32(w32)) = (libs::OpenBlas::load(), f32w.data()) {
            time_library(&mut g, "openblas_f32", (&x, m, &f32w), |y| blas.sgemm_t(&x, m, w32, n, k, y));
        }
        g.finish();
    }
}

/// Times a library's `call` (writing `y = x · wᵀ` into its argument) as `name`, once it is checked
/// to compute what ours does on `(x, m, w)` to bf16 rounding of the sums (a wrong call is never timed).
fn time_library(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    (x, m, w): (&[f32], usize, &Weight),
    mut call: impl FnMut(&mut [f32]),
) {
    let mut ours = vec![0f32; m * w.rows()];
    matmul_t_on(simd::isa(), x, m, w, &mut ours);
    let mut y = vec![0f32; ours.len()];
    call(&mut y);
    let scale = ours.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-6);
    let worst = ours.iter().zip(&y).fold(0f32, |a, (o, l)| a.max((o - l).abs()));
    assert!(worst <= 1e-2 * scale, "{name} differs from openlora's GEMM by {worst} (scale {scale})");
    g.throughput(Throughput::Bytes(w.bytes() as u64));
    g.bench_function(name, |b| b.iter(|| call(&mut y)));
}

/// One row against weights streamed from memory: 16 distinct 4096 × 1024 bf16 weights (128 MB,
/// past any cache) taken in turn, as a batch-1 decode step reads its projections.
fn gemm_from_memory(c: &mut Criterion) {
    let benching = std::env::args().any(|a| a == "--bench");
    let (n, k, count) = if benching { (4096, 1024, 16) } else { (64, 32, 2) };
    let weights: Vec<Weight> = (0..count)
        .map(|i| {
            let data = values(n * k).iter().map(|&v| f32_to_bf16(v * (1.0 + i as f32 * 0.01))).collect();
            Weight::new(n, k, WeightData::Bf16(data)).expect("shape").with_bf16_inputs(true)
        })
        .collect();
    let x = values(k);
    let x16: Vec<u16> = x.iter().map(|&v| f32_to_bf16(v)).collect();
    let mut y = vec![0f32; n];
    let mut g = c.benchmark_group("gemm_m1_from_memory");
    g.throughput(Throughput::Bytes((n * k * 2) as u64));
    let mut turn = 0;
    g.bench_function("ours_bf16_x_bf16", |b| {
        b.iter(|| {
            turn = (turn + 1) % count;
            matmul_t_on(simd::isa(), &x, 1, &weights[turn], &mut y)
        })
    });
    if let Some(dnnl) = libs::OneDnn::load() {
        g.bench_function("onednn_bf16_x_bf16", |b| {
            b.iter(|| {
                turn = (turn + 1) % count;
                let WeightData::Bf16(w16) = weights[turn].data() else { unreachable!("bf16 weights") };
                dnnl.gemm_bf16_t(&x16, 1, w16, n, k, &mut y)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, gemm, gemm_from_memory);
criterion_main!(benches);
