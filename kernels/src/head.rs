//! One query head's attention over its context, in one pass on the best vector instructions:
//! the head's query and output held in registers while every key and value of the context
//! streams past, instead of a dot-product and an axpy call per context token.

use crate::simd::{self, Isa};
use crate::vec::{axpy, dot};

/// Where one head reads its context: the layer's key and value caches, the offset of each
/// context token's row (all KV heads) in them, and the head's offset within a row.
#[derive(Clone, Copy)]
pub struct HeadContext<'a> {
    /// Keys of the layer (rows of every KV head).
    pub k: &'a [f32],
    /// Values, same layout.
    pub v: &'a [f32],
    /// Offset of each context token's row, in position order.
    pub rows: &'a [usize],
    /// Offset of this KV head within a row.
    pub head: usize,
}

/// `out = softmax(scale · q·Kᵀ) · V` for one head over `ctx` (f32 softmax); `scores` is
/// scratch of at least `ctx.rows.len()` values.
pub fn attend(q: &[f32], ctx: HeadContext<'_>, scale: f32, scores: &mut [f32], out: &mut [f32]) {
    // SAFETY: `simd::isa()` is only ever an instruction set this CPU has.
    unsafe { attend_on(simd::isa(), q, ctx, scale, scores, out) }
}

/// [`attend`] on `isa`.
///
/// # Safety
/// `isa` is available on this CPU.
unsafe fn attend_on(isa: Isa, q: &[f32], ctx: HeadContext<'_>, scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let hd = q.len();
    assert_eq!(out.len(), hd, "one output per query element");
    assert!(scores.len() >= ctx.rows.len(), "a score per context token");
    let last = ctx.rows.iter().max().map_or(0, |&r| r + ctx.head + hd);
    assert!(last <= ctx.k.len() && last <= ctx.v.len(), "a context row outside the cache");
    let scores = &mut scores[..ctx.rows.len()];
    // SAFETY: `isa` is available (the caller's contract); every row read lies in the caches
    // (checked above) and `q`, `out` are `hd` long.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match (isa, hd) {
            (Isa::Avx512 | Isa::Avx512Bf16, 64) => return x86::attend512::<4>(q, ctx, scale, scores, out),
            (Isa::Avx512 | Isa::Avx512Bf16, 128) => return x86::attend512::<8>(q, ctx, scale, scores, out),
            (Isa::Avx512 | Isa::Avx512Bf16, 256) => return x86::attend512::<16>(q, ctx, scale, scores, out),
            (Isa::Avx2, 64) => return x86::attend256::<8>(q, ctx, scale, scores, out),
            (Isa::Avx2, 128) => return x86::attend256::<16>(q, ctx, scale, scores, out),
            _ => {}
        }
    }
    portable(q, ctx, scale, scores, out);
}

/// Any head width: a dot product and an axpy per context token.
fn portable(q: &[f32], ctx: HeadContext<'_>, scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let hd = q.len();
    let mut max = f32::NEG_INFINITY;
    for (sc, &r) in scores.iter_mut().zip(ctx.rows) {
        let at = r + ctx.head;
        *sc = dot(q, &ctx.k[at..at + hd]) * scale;
        max = max.max(*sc);
    }
    let sum = exp_sum(scores, max);
    out.fill(0.0);
    for (sc, &r) in scores.iter().zip(ctx.rows) {
        let at = r + ctx.head;
        axpy(out, sc / sum, &ctx.v[at..at + hd]);
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

    /// A head of `16 · NV` elements on AVX-512.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL are available; `q` and `out` are `16 · NV` long; every context row plus
    /// the head offset has `16 · NV` elements in both caches.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn attend512<const NV: usize>(
        q: &[f32],
        ctx: HeadContext<'_>,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        // SAFETY: every load and store is within the slices the caller vouches for.
        unsafe {
            let mut qv = [_mm512_setzero_ps(); NV];
            for (i, r) in qv.iter_mut().enumerate() {
                *r = _mm512_loadu_ps(q.as_ptr().add(16 * i));
            }
            let mut max = f32::NEG_INFINITY;
            for (sc, &r) in scores.iter_mut().zip(ctx.rows) {
                let kp = ctx.k.as_ptr().add(r + ctx.head);
                let mut s = _mm512_setzero_ps();
                for (i, qi) in qv.iter().enumerate() {
                    s = _mm512_fmadd_ps(*qi, _mm512_loadu_ps(kp.add(16 * i)), s);
                }
                *sc = _mm512_reduce_add_ps(s) * scale;
                max = max.max(*sc);
            }
            let inv = 1.0 / exp_sum(scores, max);
            let mut acc = [_mm512_setzero_ps(); NV];
            for (&sc, &r) in scores.iter().zip(ctx.rows) {
                let p = _mm512_set1_ps(sc * inv);
                let vp = ctx.v.as_ptr().add(r + ctx.head);
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(p, _mm512_loadu_ps(vp.add(16 * i)), *a);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(16 * i), *a);
            }
        }
    }

    /// A head of `8 · NV` elements on AVX2 with FMA.
    ///
    /// # Safety
    /// As [`attend512`], for AVX2 + FMA and `8 · NV` elements.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend256<const NV: usize>(
        q: &[f32],
        ctx: HeadContext<'_>,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        // SAFETY: every load and store is within the slices the caller vouches for.
        unsafe {
            let mut max = f32::NEG_INFINITY;
            for (sc, &r) in scores.iter_mut().zip(ctx.rows) {
                let kp = ctx.k.as_ptr().add(r + ctx.head);
                let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for i in (0..NV).step_by(2) {
                    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(8 * i)), _mm256_loadu_ps(kp.add(8 * i)), s0);
                    let j = 8 * (i + 1);
                    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(j)), _mm256_loadu_ps(kp.add(j)), s1);
                }
                let s = _mm256_add_ps(s0, s1);
                let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                *sc = _mm_cvtss_f32(s) * scale;
                max = max.max(*sc);
            }
            let inv = 1.0 / exp_sum(scores, max);
            let mut acc = [_mm256_setzero_ps(); NV];
            for (&sc, &r) in scores.iter().zip(ctx.rows) {
                let p = _mm256_set1_ps(sc * inv);
                let vp = ctx.v.as_ptr().add(r + ctx.head);
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp.add(8 * i)), *a);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every head width, on every instruction set this CPU has, against the portable pass.
    #[test]
    fn every_width_matches_the_portable_pass() {
        let mut seed = 11u64;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect()
        };
        for hd in [8usize, 48, 64, 80, 128, 256] {
            let (kv_heads, tokens) = (2, 37);
            let row = kv_heads * hd;
            let (k, v, q) = (rnd(tokens * row), rnd(tokens * row), rnd(hd));
            // Context rows out of order, as block tables scatter them.
            let rows: Vec<usize> = (0..tokens).map(|t| ((t * 7) % tokens) * row).collect();
            let ctx = HeadContext { k: &k, v: &v, rows: &rows, head: hd };
            let mut want = vec![0f32; hd];
            portable(&q, ctx, 0.3, &mut vec![0.0; tokens], &mut want);
            for isa in Isa::ALL.into_iter().filter(|&i| simd::available(i)) {
                let mut got = vec![1f32; hd];
                // SAFETY: only the available instruction sets are tried.
                unsafe { attend_on(isa, &q, ctx, 0.3, &mut vec![0.0; tokens + 3], &mut got) };
                let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(d < 1e-6, "head width {hd} on {isa:?}: {d}");
            }
        }
    }
}
