//! Dense `y = x · Wᵀ` on the CPU for a weight held in its stored dtype (f32, bf16 or f16),
//! accumulating in f32, with the instruction set chosen once at run time.
//!
//! The weight is `[out, in]` as Hugging Face stores it, so every output is a dot product of an
//! `x` row and a weight row, both contiguous in `in`. A tile of `MR` rows of `x` and `NR` weight
//! rows keeps `MR × NR` vector accumulators in registers; the weight rows are streamed from
//! memory once per call and the (small) `x` stays in cache. Output columns are split between
//! rayon's threads. With AVX-512-BF16 a bf16 weight is multiplied by `x` rounded to bf16 with
//! `vdpbf16ps` (32 products per instruction, f32 sums), as transformers' own bf16 matmul rounds
//! its input; every other path converts the weight to f32 in registers and uses f32 FMAs.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::aligned::Aligned;
use crate::floats::{bf16_to_f32, f16_to_f32};
use crate::simd::{self, Isa};

/// A weight's elements in the dtype they are kept in.
#[derive(Debug, Clone)]
pub enum WeightData {
    /// 32-bit floats.
    F32(Aligned<f32>),
    /// bfloat16, as raw bits.
    Bf16(Aligned<u16>),
    /// IEEE half precision, as raw bits.
    F16(Aligned<u16>),
    /// Weight-only int8: `w[r, c] ≈ q[r, c] · scales[r]` (one scale per row, symmetric).
    Int8 {
        /// The quantised values, row-major.
        q: Aligned<i8>,
        /// One scale per row (output channel).
        scales: Vec<f32>,
    },
}

/// A row-major `[rows, cols]` weight matrix (`[out, in]` for a projection) in its kept dtype.
#[derive(Debug, Clone)]
pub struct Weight {
    rows: usize,
    cols: usize,
    data: WeightData,
    /// A bf16 weight may meet its input rounded to bf16 (the model computes in bf16).
    bf16_inputs: bool,
}

/// Why a [`Weight`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// Elements that `rows × cols` needs.
    pub expected: usize,
    /// Elements given.
    pub got: usize,
}

impl Weight {
    /// A `[rows, cols]` weight over `data`, refused when the element count differs.
    pub fn new(rows: usize, cols: usize, data: WeightData) -> Result<Self, ShapeMismatch> {
        let got = match &data {
            WeightData::F32(v) => v.len(),
            WeightData::Bf16(v) | WeightData::F16(v) => v.len(),
            WeightData::Int8 { q, scales } => {
                if scales.len() != rows {
                    return Err(ShapeMismatch { expected: rows, got: scales.len() });
                }
                q.len()
            }
        };
        // A shape whose element count overflows matches no data.
        let expected = rows.saturating_mul(cols);
        if got != expected {
            return Err(ShapeMismatch { expected, got });
        }
        Ok(Weight { rows, cols, data, bf16_inputs: false })
    }

    /// Lets a bf16 weight be multiplied by its input rounded to bf16, as a model computing in
    /// bf16 does: with AVX-512-BF16 that doubles the multiply throughput.
    pub fn with_bf16_inputs(mut self, allowed: bool) -> Self {
        self.bf16_inputs = allowed;
        self
    }

    /// A `[rows, cols]` f32 matrix quantised to weight-only int8 with one symmetric scale per
    /// row (its largest magnitude maps to 127), rounding to nearest.
    pub fn quantize_int8(rows: usize, cols: usize, data: &[f32]) -> Result<Self, ShapeMismatch> {
        if data.len() != rows * cols {
            return Err(ShapeMismatch { expected: rows * cols, got: data.len() });
        }
        let mut q = Vec::with_capacity(data.len());
        let mut scales = Vec::with_capacity(rows);
        for row in data.chunks_exact(cols.max(1)).take(rows) {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = if max > 0.0 && max.is_finite() { max / 127.0 } else { 1.0 };
            q.extend(row.iter().map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8));
            scales.push(scale);
        }
        q.resize(rows * cols, 0);
        scales.resize(rows, 1.0);
        Weight::new(rows, cols, WeightData::Int8 { q: q.into(), scales })
    }

    /// Output features (the weight's rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (the weight's columns).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The elements as kept.
    pub fn data(&self) -> &WeightData {
        &self.data
    }

    /// Bytes the elements take.
    pub fn bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(v) => v.len() * 4,
            WeightData::Bf16(v) | WeightData::F16(v) => v.len() * 2,
            WeightData::Int8 { q, scales } => q.len() + scales.len() * 4,
        }
    }

    /// Row `r` widened to f32 into `out` (`cols` long): an embedding lookup.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            WeightData::F32(v) => out.copy_from_slice(&v[range]),
            WeightData::Bf16(v) => out.iter_mut().zip(&v[range]).for_each(|(o, &b)| *o = bf16_to_f32(b)),
            WeightData::F16(v) => out.iter_mut().zip(&v[range]).for_each(|(o, &b)| *o = f16_to_f32(b)),
            WeightData::Int8 { q, scales } => {
                out.iter_mut().zip(&q[range]).for_each(|(o, &v)| *o = f32::from(v) * scales[r])
            }
        }
    }
}

/// `y[m, rows] = x[m, cols] · Wᵀ` on the instruction set chosen for this machine.
pub fn matmul_t(x: &[f32], m: usize, w: &Weight, y: &mut [f32]) {
    matmul_t_on(simd::isa(), x, m, w, y);
}

/// Work (multiply-adds) below which a call runs on the calling thread alone.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// [`matmul_t`] on a given instruction set (which must be available: see [`simd::available`]).
pub fn matmul_t_on(isa: Isa, x: &[f32], m: usize, w: &Weight, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(Some(x.len()), m.checked_mul(k), "x is not [m, in]");
    assert_eq!(Some(y.len()), m.checked_mul(n), "y is not [m, out]");
    assert!(simd::available(isa), "instruction set {isa:?} is not available on this CPU");
    if m == 0 || n == 0 {
        return;
    }
    // With AVX-512-BF16 a bf16 weight that allows it meets x rounded to bf16.
    let use_dpbf16 = isa == Isa::Avx512Bf16 && w.bf16_inputs && matches!(w.data, WeightData::Bf16(_));
    // One kept buffer for the whole process (a step may run on any of rayon's threads; one
    // buffer per thread would each grow to the largest prefill); a call that finds it in use
    // by another takes a buffer of its own. Its rows start on a cache line (see `aligned`).
    let mut kept = if use_dpbf16 { X16.try_lock().ok() } else { None };
    let mut own = Aligned::new();
    let buffer: &mut Aligned<u16> = kept.as_deref_mut().unwrap_or(&mut own);
    let x16 = buffer.scratch(if use_dpbf16 { x.len() } else { 0 });
    if use_dpbf16 {
        // A prefill's x is megabytes: rounded on every thread, not on the caller's alone.
        x16.par_chunks_mut(ROUND_CHUNK).zip(x.par_chunks(ROUND_CHUNK)).for_each(|(h, f)| {
            // SAFETY: `isa` is available (asserted above).
            unsafe { simd::round_bf16(isa, f, h) }
        });
    }
    let x16: &[u16] = x16;
    let out = OutPtr(y.as_mut_ptr());
    let run = |c0: usize, c1: usize| {
        // SAFETY: every column range [c0, c1) is handed to exactly one task, so the writes of
        // different tasks (columns c0..c1 of each of the m rows of y) never overlap, and y
        // outlives the parallel loop below.
        unsafe { columns(isa, use_dpbf16, x, x16, m, w, c0, c1, out.get(), n) }
    };
    let threads = rayon::current_num_threads();
    if m * n * k < PARALLEL_MIN_MACS || threads == 1 {
        run(0, n);
    } else {
        // Several chunks per thread, each a multiple of the tile width, for balance.
        let chunk = n.div_ceil(threads * 8).next_multiple_of(NR).max(NR);
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|t| run(t * chunk, ((t + 1) * chunk).min(n)));
    }
}

/// Elements of `x` one task rounds to bf16.
const ROUND_CHUNK: usize = 1 << 15;

/// The bf16 copy of `x` a dpbf16 matmul reads, kept to avoid an allocation per call.
static X16: std::sync::Mutex<Aligned<u16>> = std::sync::Mutex::new(Aligned::new());

/// The output pointer shared by the tasks of one call.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: the tasks of one `matmul_t_on` call write disjoint columns of y (see `run`).
unsafe impl Send for OutPtr {}
// SAFETY: as above; the pointer is only written through, at disjoint elements.
unsafe impl Sync for OutPtr {}

/// Weight rows (output columns) per tile.
const NR: usize = 4;
/// `x` rows per tile.
const MR: usize = 4;
/// Weight rows per tile when `x` is one row (AVX-512-BF16 tiles).
const WIDE_NR: usize = 8;

/// Computes columns `[c0, c1)` of every row of `y` (row stride `ldy`).
///
/// # Safety
/// `y` must be valid for writes of `m × ldy` floats, no other thread may touch those columns
/// meanwhile, and `isa` must be available.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    isa: Isa,
    use_dpbf16: bool,
    x: &[f32],
    x16: &[u16],
    m: usize,
    w: &Weight,
    c0: usize,
    c1: usize,
    y: *mut f32,
    ldy: usize,
) {
    let k = w.cols;
    // A prefill's x rows are taken a block at a time, so that the block stays in L2 while the
    // task's weight columns pass over it (measured 5-10% faster at 512 rows than all at once).
    let block = row_block(k);
    let mut i0 = 0;
    while i0 < m {
        let i1 = (i0 + block).min(m);
        let passes = (i1 - i0).div_ceil(MR);
        // One row (a batch-1 decode step) takes tiles of eight weight rows: more of them streamed
        // at once (measured 10% faster from memory than four; sixteen was slower). Each column's
        // sum is reduced as in a tile of four, so a row's result does not depend on its batch.
        let wide = if use_dpbf16 && i1 - i0 == 1 { WIDE_NR } else { NR };
        let mut j = c0;
        while j < c1 {
            let nr = if c1 - j >= wide {
                wide
            } else if c1 - j >= NR {
                NR
            } else {
                1
            };
            let mut i = i0;
            while i < i1 {
                let mr = (i1 - i).min(MR);
                // SAFETY: rows i..i+mr of x and weight rows j..j+nr exist (checked shapes), and
                // the caller owns columns j..j+nr of y.
                unsafe {
                    let yp = y.add(i * ldy + j);
                    if use_dpbf16 {
                        let WeightData::Bf16(wd) = &w.data else { unreachable!("dpbf16 needs a bf16 weight") };
                        // The next tile's weight rows, fetched while x meets these ones: each pass
                        // of x rows over this tile fetches its share of them.
                        // (A wide single-row tile prefetches the first four rows of the next:
                        // all eight measured no faster.)
                        let (first, rows) = prefetch_share((i - i0) / MR, passes, NR);
                        let next = wd.as_ptr().wrapping_add((j + nr + first) * k);
                        let xp = x16.as_ptr().add(i * k);
                        simd::tile_dpbf16(mr, nr, xp, wd.as_ptr().add(j * k), next, rows, k, yp, ldy);
                    } else {
                        let xp = x.as_ptr().add(i * k);
                        match &w.data {
                            WeightData::F32(wd) => simd::tile_f32(isa, mr, nr, xp, wd.as_ptr().add(j * k), k, yp, ldy),
                            WeightData::Bf16(wd) => {
                                simd::tile_bf16(isa, mr, nr, xp, wd.as_ptr().add(j * k), k, yp, ldy)
                            }
                            WeightData::F16(wd) => simd::tile_f16(isa, mr, nr, xp, wd.as_ptr().add(j * k), k, yp, ldy),
                            WeightData::Int8 { q, scales } => {
                                simd::tile_int8(isa, mr, nr, xp, q.as_ptr().add(j * k), k, yp, ldy);
                                // The row scales, applied once to each finished sum.
                                for r in 0..mr {
                                    for (c, s) in scales[j..j + nr].iter().enumerate() {
                                        *yp.add(r * ldy + c) *= s;
                                    }
                                }
                            }
                        }
                    }
                }
                i += mr;
            }
            j += nr;
        }
        i0 = i1;
    }
}

/// Rows of x a block holds: as many as fill a quarter of a 1 MiB L2 in bf16, a whole number
/// of tiles (at least one).
fn row_block(k: usize) -> usize {
    ((256 << 10) / (2 * k.max(1)) / MR * MR).max(MR)
}

/// Which of the next tile's `rows` weight rows pass `pass` of `passes` (row tiles of x over
/// one weight tile) prefetches, as (first, count): the rows spread evenly over the passes.
fn prefetch_share(pass: usize, passes: usize, rows: usize) -> (usize, usize) {
    let (first, end) = (pass * rows / passes, (pass + 1) * rows / passes);
    (first, end - first)
}

/// Threads a model step's `matmul_t` calls are split between (the compute pool's).
pub fn threads() -> usize {
    crate::compute::threads()
}

/// The name of the instruction set `matmul_t` uses on this machine (for logs and benchmarks).
pub fn isa_name() -> &'static str {
    static NAME: OnceLock<&'static str> = OnceLock::new();
    NAME.get_or_init(|| simd::isa().name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::floats::f32_to_bf16;

    #[test]
    fn row_blocks_are_whole_tiles_that_fit_a_quarter_of_l2() {
        assert_eq!(row_block(1024), 128);
        assert_eq!(row_block(3456), 36);
        assert_eq!(row_block(1 << 20), MR);
        assert_eq!(row_block(0) % MR, 0);
    }

    #[test]
    fn the_passes_over_a_tile_prefetch_each_next_row_once() {
        for passes in [1usize, 2, 3, 4, 5, 16, 128] {
            let mut next = 0;
            for pass in 0..passes {
                let (first, rows) = prefetch_share(pass, passes, NR);
                assert_eq!(first, next, "{passes} passes: pass {pass} starts where the last ended");
                assert!(rows <= NR.div_ceil(passes), "{passes} passes: evenly spread");
                next = first + rows;
            }
            assert_eq!(next, NR, "{passes} passes: every row");
        }
    }

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|t| f64::from(x[i * k + t]) * f64::from(w[j * k + t])).sum::<f64>() as f32;
            }
        }
        y
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Every available instruction set, every dtype, shapes with every kind of tail (the last
    /// one's rows in two blocks of `row_block`).
    #[test]
    fn matches_naive_on_every_isa_and_dtype() {
        for &isa in Isa::ALL.iter().filter(|&&i| simd::available(i)) {
            for &(m, n, k) in &[
                (1, 1, 1),
                (1, 7, 33),
                (3, 9, 17),
                (4, 8, 64),
                (5, 13, 100),
                (16, 70, 1024),
                (9, 300, 40),
                (130, 6, 1024),
            ] {
                let x = data(m * k, (m * 31 + n * 7 + k) as u32);
                let wf = data(n * k, (n + k) as u32);
                // Round the weight to each half dtype first, so the reference sees what is kept.
                let wb: Vec<u16> = wf.iter().map(|&v| f32_to_bf16(v)).collect();
                let wh: Vec<u16> = wf.iter().map(|&v| half_bits(v)).collect();
                let cases = [
                    (Weight::new(n, k, WeightData::F32(wf.clone().into())).expect("shape"), wf.clone(), 1e-5f32),
                    (
                        Weight::new(n, k, WeightData::Bf16(wb.clone().into())).expect("shape"),
                        wb.iter().map(|&b| bf16_to_f32(b)).collect(),
                        1e-5,
                    ),
                    (
                        Weight::new(n, k, WeightData::Bf16(wb.clone().into())).expect("shape").with_bf16_inputs(true),
                        wb.iter().map(|&b| bf16_to_f32(b)).collect(),
                        // dpbf16 also rounds x to bf16: relative 2^-8 per product.
                        if isa == Isa::Avx512Bf16 { 1e-2 } else { 1e-5 },
                    ),
                    (
                        Weight::new(n, k, WeightData::F16(wh.clone().into())).expect("shape"),
                        wh.iter().map(|&b| f16_to_f32(b)).collect(),
                        1e-5,
                    ),
                    int8_case(n, k, &wf),
                ];
                for (w, reference, tol) in cases {
                    let want = naive(&x, m, &reference, n, k);
                    let mut got = vec![f32::NAN; m * n];
                    matmul_t_on(isa, &x, m, &w, &mut got);
                    let scale = (k as f32).sqrt();
                    for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= tol * scale.max(b.abs()),
                            "{isa:?} {:?} m{m} n{n} k{k} at {idx}: {a} vs {b}",
                            std::mem::discriminant(w.data())
                        );
                    }
                }
            }
        }
    }

    /// An int8 weight of `wf` and, as the reference, exactly the values it stands for.
    fn int8_case(n: usize, k: usize, wf: &[f32]) -> (Weight, Vec<f32>, f32) {
        let w = Weight::quantize_int8(n, k, wf).expect("shape");
        let WeightData::Int8 { q, scales } = w.data() else { unreachable!("int8") };
        let reference = q.iter().enumerate().map(|(i, &v)| f32::from(v) * scales[i / k]).collect();
        // Each quantised value lies within half a step of the f32 one.
        for (i, (&a, &b)) in wf.iter().zip(q.iter()).enumerate() {
            assert!((a - f32::from(b) * scales[i / k]).abs() <= scales[i / k] * 0.5 + 1e-7);
        }
        (w, reference, 1e-5)
    }

    fn half_bits(v: f32) -> u16 {
        // Exact for the test's values' range is not needed: any f16 the kernel reads is fine,
        // as long as the reference widens the same bits. Truncate the mantissa.
        let b = v.to_bits();
        let sign = ((b >> 16) & 0x8000) as u16;
        let exp = ((b >> 23) & 0xFF) as i32 - 127 + 15;
        if exp <= 0 {
            return sign;
        }
        sign | ((exp as u16) << 10) | ((b >> 13) & 0x3FF) as u16
    }

    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        if !simd::available(Isa::Avx512Bf16) {
            return;
        }
        let (n, k, m) = (77, 300, 16);
        let wf = data(n * k, 3);
        let w = Weight::new(n, k, WeightData::Bf16(wf.iter().map(|&v| crate::floats::f32_to_bf16(v)).collect()))
            .expect("shape")
            .with_bf16_inputs(true);
        let x = data(m * k, 4);
        let mut batch = vec![0f32; m * n];
        matmul_t_on(Isa::Avx512Bf16, &x, m, &w, &mut batch);
        for r in 0..m {
            let mut alone = vec![0f32; n];
            matmul_t_on(Isa::Avx512Bf16, &x[r * k..(r + 1) * k], 1, &w, &mut alone);
            let same = alone.iter().zip(&batch[r * n..(r + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "row {r}: alone differs from in a batch of {m}");
        }
    }

    #[test]
    fn embedding_rows_widen() {
        let w = Weight::new(2, 2, WeightData::Bf16(vec![0x3F80, 0x4000, 0xBF80, 0].into())).expect("shape");
        let mut row = [0f32; 2];
        w.row_into(1, &mut row);
        assert_eq!(row, [-1.0, 0.0]);
        assert!(Weight::new(2, 3, WeightData::F32(vec![0.0; 5].into())).is_err());
    }
}
