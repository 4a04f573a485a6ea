//! One query head's attention over its context, in one pass on the best vector instructions:
//! the head's query and output held in registers while every key and value of the context
//! streams past, instead of a dot-product and an axpy call per context token.

use crate::floats::f32_to_bf16;
use crate::simd::{self, Isa};
use crate::vec::{axpy, axpy_bf16, dot, dot_bf16};

/// What a KV cache holds its keys and values in: `f32`, or bf16 as raw bits (`u16`, the top
/// half of an f32), which halves the bytes attention streams.
pub trait KvValue: Copy + Default + Send + Sync + 'static {
    /// `v` as kept in the cache (bf16: rounded to nearest even).
    fn from_f32(v: f32) -> Self;
    /// `Σ a[i] · b[i]`, `b` widened to f32.
    fn dot(a: &[f32], b: &[Self]) -> f32;
    /// `y += alpha · x`, `x` widened to f32.
    fn axpy(y: &mut [f32], alpha: f32, x: &[Self]);
    /// The one-pass kernel of `isa` for a head of `q.len()` elements, if there is one; whether
    /// it ran.
    ///
    /// # Safety
    /// As [`attend_on`], whose checks have passed.
    unsafe fn one_pass(
        isa: Isa,
        q: &[f32],
        ctx: HeadContext<'_, Self>,
        scale: f32,
        s: &mut [f32],
        o: &mut [f32],
    ) -> bool;
}

/// Implements [`KvValue`] for a cache element type: its rounding from f32, its widening dot
/// product and axpy, and its one-pass kernels (AVX-512 and AVX2).
macro_rules! kv_value {
    ($ty:ty, $from:expr, $dot:path, $axpy:path, $pass512:ident, $pass256:ident) => {
        impl KvValue for $ty {
            fn from_f32(v: f32) -> Self {
                $from(v)
            }

            fn dot(a: &[f32], b: &[$ty]) -> f32 {
                $dot(a, b)
            }

            fn axpy(y: &mut [f32], alpha: f32, x: &[$ty]) {
                $axpy(y, alpha, x)
            }

            unsafe fn one_pass(
                isa: Isa,
                q: &[f32],
                ctx: HeadContext<'_, $ty>,
                scale: f32,
                s: &mut [f32],
                o: &mut [f32],
            ) -> bool {
                // SAFETY: the caller's contract (checked bounds, available `isa`).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match (isa, q.len()) {
                        (Isa::Avx512 | Isa::Avx512Bf16, 64) => x86::$pass512::<4>(q, ctx, scale, s, o),
                        (Isa::Avx512 | Isa::Avx512Bf16, 128) => x86::$pass512::<8>(q, ctx, scale, s, o),
                        (Isa::Avx512 | Isa::Avx512Bf16, 256) => x86::$pass512::<16>(q, ctx, scale, s, o),
                        (Isa::Avx2, 64) => x86::$pass256::<8>(q, ctx, scale, s, o),
                        (Isa::Avx2, 128) => x86::$pass256::<16>(q, ctx, scale, s, o),
                        _ => return false,
                    }
                    true
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (isa, q, ctx, scale, s, o);
                    false
                }
            }
        }
    };
}

kv_value!(f32, std::convert::identity, dot, axpy, attend512, attend256);
kv_value!(u16, f32_to_bf16, dot_bf16, axpy_bf16, attend512_bf16, attend256_bf16);

/// Where one head reads its context: the layer's key and value caches, the offset of each
/// context token's row (all KV heads) in them, and the head's offset within a row.
pub struct HeadContext<'a, T> {
    /// Keys of the layer (rows of every KV head).
    k: &'a [T],
    /// Values, same layout.
    v: &'a [T],
    /// Offset of each context token's row, in position order.
    rows: &'a [usize],
    /// The largest of `rows` (found once for every head of a query row).
    last: usize,
    /// Offset of this KV head within a row.
    head: usize,
}

impl<T> Clone for HeadContext<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for HeadContext<'_, T> {}

impl<'a, T> HeadContext<'a, T> {
    /// The context of rows `rows` (offsets into `k` and `v`), for the head at offset 0.
    pub fn new(k: &'a [T], v: &'a [T], rows: &'a [usize]) -> Self {
        HeadContext { k, v, rows, last: rows.iter().copied().max().unwrap_or(0), head: 0 }
    }

    /// The same context for the KV head at offset `head` within a row.
    pub fn at_head(self, head: usize) -> Self {
        HeadContext { head, ..self }
    }
}

/// `out = softmax(scale · q·Kᵀ) · V` for one head over `ctx` (f32 softmax); `scores` is
/// scratch of at least `ctx.rows.len()` values.
pub fn attend<T: KvValue>(q: &[f32], ctx: HeadContext<'_, T>, scale: f32, scores: &mut [f32], out: &mut [f32]) {
    // SAFETY: `simd::isa()` is only ever an instruction set this CPU has.
    unsafe { attend_on(simd::isa(), q, ctx, scale, scores, out) }
}

/// [`attend`] on `isa`.
///
/// # Safety
/// `isa` is available on this CPU.
unsafe fn attend_on<T: KvValue>(
    isa: Isa,
    q: &[f32],
    ctx: HeadContext<'_, T>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    assert_eq!(out.len(), hd, "one output per query element");
    assert!(scores.len() >= ctx.rows.len(), "a score per context token");
    let end =
        if ctx.rows.is_empty() { Some(0) } else { ctx.last.checked_add(ctx.head).and_then(|e| e.checked_add(hd)) };
    assert!(end.is_some_and(|e| e <= ctx.k.len() && e <= ctx.v.len()), "a context row outside the cache");
    let scores = &mut scores[..ctx.rows.len()];
    // SAFETY: `isa` is available (the caller's contract); every row read lies in the caches
    // (checked above) and `q`, `out` are `hd` long.
    if unsafe { T::one_pass(isa, q, ctx, scale, scores, out) } {
        return;
    }
    portable(q, ctx, scale, scores, out);
}

/// Any head width: a dot product and an axpy per context token.
fn portable<T: KvValue>(q: &[f32], ctx: HeadContext<'_, T>, scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let hd = q.len();
    let mut max = f32::NEG_INFINITY;
    for (sc, &r) in scores.iter_mut().zip(ctx.rows) {
        let at = r + ctx.head;
        *sc = T::dot(q, &ctx.k[at..at + hd]) * scale;
        max = max.max(*sc);
    }
    let sum = exp_sum(scores, max);
    out.fill(0.0);
    for (sc, &r) in scores.iter().zip(ctx.rows) {
        let at = r + ctx.head;
        T::axpy(out, sc / sum, &ctx.v[at..at + hd]);
    }
}

/// Replaces each score by `exp(score - max)`; returns their sum.
#[inline]
fn exp_sum(scores: &mut [f32], max: f32) -> f32 {
    let mut sum = 0f32;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{HeadContext, exp_sum};
    use crate::simd::x86::hsum256;

    /// Generates one instruction set's head pass over `LANES · NV` elements, given the cache's
    /// element type and its widening load, and the vector operations (zero, load, store,
    /// broadcast, fused multiply-add, lane sum).
    macro_rules! head_pass {
        ($name:ident, $kty:ty, $kload:ident, $features:literal, $lanes:literal, $zero:ident, $load:ident,
         $store:ident, $set1:ident, $fmadd:ident, $sum:ident) => {
            /// A head of `LANES · NV` elements (see the macro).
            ///
            /// # Safety
            /// The instruction set is available; `q` and `out` are `LANES · NV` long; every
            /// context row plus the head offset has `LANES · NV` elements in both caches.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const NV: usize>(
                q: &[f32],
                ctx: HeadContext<'_, $kty>,
                scale: f32,
                scores: &mut [f32],
                out: &mut [f32],
            ) {
                // SAFETY: every load and store is within the slices the caller vouches for.
                unsafe {
                    let mut qv = [$zero(); NV];
                    for (i, r) in qv.iter_mut().enumerate() {
                        *r = $load(q.as_ptr().add($lanes * i));
                    }
                    let mut max = f32::NEG_INFINITY;
                    for (sc, &r) in scores.iter_mut().zip(ctx.rows) {
                        let kp = ctx.k.as_ptr().add(r + ctx.head);
                        let mut s = $zero();
                        for (i, qi) in qv.iter().enumerate() {
                            s = $fmadd(*qi, $kload(kp.add($lanes * i)), s);
                        }
                        *sc = $sum(s) * scale;
                        max = max.max(*sc);
                    }
                    let inv = 1.0 / exp_sum(scores, max);
                    let mut acc = [$zero(); NV];
                    for (&sc, &r) in scores.iter().zip(ctx.rows) {
                        let p = $set1(sc * inv);
                        let vp = ctx.v.as_ptr().add(r + ctx.head);
                        for (i, a) in acc.iter_mut().enumerate() {
                            *a = $fmadd(p, $kload(vp.add($lanes * i)), *a);
                        }
                    }
                    for (i, a) in acc.iter().enumerate() {
                        $store(out.as_mut_ptr().add($lanes * i), *a);
                    }
                }
            }
        };
    }

    /// 16 bf16 values (as bits) widened to f32 exactly.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_bf16_512(p: *const u16) -> __m512 {
        // SAFETY: the caller vouches for 16 readable values at `p`.
        let h = unsafe { _mm256_loadu_si256(p.cast::<__m256i>()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    /// 8 bf16 values (as bits) widened to f32 exactly.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_bf16_256(p: *const u16) -> __m256 {
        // SAFETY: the caller vouches for 8 readable values at `p`.
        let h = unsafe { _mm_loadu_si128(p.cast::<__m128i>()) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    head_pass!(
        attend512,
        f32,
        _mm512_loadu_ps,
        "avx512f,avx512bw,avx512vl",
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );
    head_pass!(
        attend512_bf16,
        u16,
        load_bf16_512,
        "avx512f,avx512bw,avx512vl",
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );
    head_pass!(
        attend256,
        f32,
        _mm256_loadu_ps,
        "avx2,fma,f16c",
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        hsum256
    );
    head_pass!(
        attend256_bf16,
        u16,
        load_bf16_256,
        "avx2,fma,f16c",
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        hsum256
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::Lcg;

    /// Every head width, on every instruction set this CPU has, against the portable pass.
    #[test]
    fn every_width_matches_the_portable_pass() {
        let mut lcg = Lcg(11);
        let mut rnd = |n: usize| lcg.vec(n);
        for hd in [8usize, 48, 64, 80, 128, 256] {
            let (kv_heads, tokens) = (2, 37);
            let row = kv_heads * hd;
            let (k, v, q) = (rnd(tokens * row), rnd(tokens * row), rnd(hd));
            // Context rows out of order, as block tables scatter them.
            let rows: Vec<usize> = (0..tokens).map(|t| ((t * 7) % tokens) * row).collect();
            let ctx = HeadContext::new(&k, &v, &rows).at_head(hd);
            let mut want = vec![0f32; hd];
            portable(&q, ctx, 0.3, &mut vec![0.0; tokens], &mut want);
            for isa in Isa::ALL.into_iter().filter(|&i| simd::available(i)) {
                let mut got = vec![1f32; hd];
                // SAFETY: only the available instruction sets are tried.
                unsafe { attend_on(isa, &q, ctx, 0.3, &mut vec![0.0; tokens + 3], &mut got) };
                let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(d < 1e-6, "head width {hd} on {isa:?}: {d}");
            }
            // A bf16 cache: every instruction set gives what the f32 pass gives on the same
            // values widened (the widening is exact).
            let (kh, vh): (Vec<u16>, Vec<u16>) =
                (k.iter().map(|&x| u16::from_f32(x)).collect(), v.iter().map(|&x| u16::from_f32(x)).collect());
            let (kw, vw): (Vec<f32>, Vec<f32>) = (
                kh.iter().map(|&b| crate::floats::bf16_to_f32(b)).collect(),
                vh.iter().map(|&b| crate::floats::bf16_to_f32(b)).collect(),
            );
            let mut want = vec![0f32; hd];
            portable(&q, HeadContext::new(&kw, &vw, &rows).at_head(hd), 0.3, &mut vec![0.0; tokens], &mut want);
            let ctx = HeadContext::new(&kh, &vh, &rows).at_head(hd);
            for isa in Isa::ALL.into_iter().filter(|&i| simd::available(i)) {
                let mut got = vec![1f32; hd];
                // SAFETY: only the available instruction sets are tried.
                unsafe { attend_on(isa, &q, ctx, 0.3, &mut vec![0.0; tokens + 3], &mut got) };
                let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(d < 1e-6, "bf16 cache, head width {hd} on {isa:?}: {d}");
            }
        }
    }
}
