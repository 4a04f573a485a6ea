//! One projection `y = x · Wᵀ` of a 1024-wide model (a 4096 × 1024 weight), at decode batch 1
//! and 16 and a 256-token prefill, side by side in one run: candle-core's f32 matmul (the CPU path before weights were
//! kept in their stored dtype) and openlora's GEMM on an f32, a bf16, an f16 and an int8 weight
//! (and a bf16 weight meeting its input rounded to bf16), on every instruction set this CPU has. Throughput is in weight bytes read per second.

use candle_core::{Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use openlora_kernels::floats::f32_to_bf16;
use openlora_kernels::gemm::{Weight, WeightData, matmul_t_on};
use openlora_kernels::simd::{self, Isa};

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
        g.finish();
    }
}

criterion_group!(benches, gemm);
criterion_main!(benches);
