//! Small dense vector primitives (the LoRA op's and attention's), on the vector instructions
//! [`crate::simd`] finds at run time.

/// Dot product of two equal-length slices, on the best vector instructions this CPU has.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: `simd::isa()` is only ever an instruction set this CPU has.
    unsafe { crate::simd::dot(crate::simd::isa(), a, b) }
}

/// `y += alpha · x` over equal-length slices, on the best vector instructions this CPU has.
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    // SAFETY: as in `dot`.
    unsafe { crate::simd::axpy(crate::simd::isa(), y, alpha, x) }
}

/// [`dot`] of f32 `a` and bf16 `b` (as bits: the top half of an f32), widened exactly.
#[inline]
pub fn dot_bf16(a: &[f32], b: &[u16]) -> f32 {
    // SAFETY: as in `dot`.
    unsafe { crate::simd::dot_bf16(crate::simd::isa(), a, b) }
}

/// [`axpy`] of bf16 `x` (as bits), widened exactly.
#[inline]
pub fn axpy_bf16(y: &mut [f32], alpha: f32, x: &[u16]) {
    // SAFETY: as in `dot`.
    unsafe { crate::simd::axpy_bf16(crate::simd::isa(), y, alpha, x) }
}

/// `(Σ|base|, Σ|out − base|)` of equal-length slices: the two L1 norms of the LoRA share (a
/// projection's base output and the adapter's delta on it). Summed in 16 independent f32 lanes,
/// which the compiler keeps in vector registers (a fixed order: the same figures on every thread,
/// instruction set and machine), then in f64.
pub fn l1_base_and_delta(base: &[f32], out: &[f32]) -> (f64, f64) {
    const LANES: usize = 16;
    assert_eq!(base.len(), out.len(), "base and output rows differ in length");
    let (mut b, mut d) = ([0f32; LANES], [0f32; LANES]);
    let (bc, oc) = (base.chunks_exact(LANES), out.chunks_exact(LANES));
    let (b_rest, o_rest) = (bc.remainder(), oc.remainder());
    for (bs, os) in bc.zip(oc) {
        for i in 0..LANES {
            b[i] += bs[i].abs();
            d[i] += (os[i] - bs[i]).abs();
        }
    }
    let mut sums = (b.iter().map(|&v| f64::from(v)).sum::<f64>(), d.iter().map(|&v| f64::from(v)).sum::<f64>());
    for (x, y) in b_rest.iter().zip(o_rest) {
        sums.0 += f64::from(x.abs());
        sums.1 += f64::from((y - x).abs());
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_norms_of_base_and_delta() {
        for n in [0usize, 1, 15, 16, 17, 1024, 1031] {
            let base: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let out: Vec<f32> = base.iter().enumerate().map(|(i, v)| v + (i as f32 * 0.11).cos() * 0.01).collect();
            let want_b: f64 = base.iter().map(|v| f64::from(v.abs())).sum();
            let want_d: f64 = base.iter().zip(&out).map(|(b, o)| f64::from((o - b).abs())).sum();
            let (b, d) = l1_base_and_delta(&base, &out);
            assert!((b - want_b).abs() <= 1e-5 * want_b.max(1.0), "n{n}: {b} vs {want_b}");
            assert!((d - want_d).abs() <= 1e-5 * want_d.max(1.0), "n{n}: {d} vs {want_d}");
        }
    }

    use crate::floats::{bf16_to_f32, f32_to_bf16};
    use crate::simd::{self, Isa};

    #[test]
    fn dot_and_axpy_on_every_isa_and_length() {
        for isa in Isa::ALL.into_iter().filter(|&i| simd::available(i)) {
            for n in [0usize, 1, 7, 8, 15, 16, 17, 19, 33, 64, 100] {
                let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
                let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.5).collect();
                let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
                // SAFETY: only the available instruction sets are tried.
                let got = unsafe { simd::dot(isa, &a, &b) };
                assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{isa:?} n{n}: {got} vs {want}");
                let mut y = b.clone();
                // SAFETY: as above.
                unsafe { simd::axpy(isa, &mut y, 2.0, &a) };
                assert!(y.iter().zip(&b).zip(&a).all(|((y, b), a)| *y == b + 2.0 * a), "{isa:?} n{n}");
                // The bf16 forms widen each weight exactly: the same as f32 on the widened values.
                let bh: Vec<u16> = b.iter().map(|&v| f32_to_bf16(v * 1.001)).collect();
                let bw: Vec<f32> = bh.iter().map(|&v| bf16_to_f32(v)).collect();
                // SAFETY: as above.
                let (got, want) = unsafe { (simd::dot_bf16(isa, &a, &bh), simd::dot(isa, &a, &bw)) };
                assert_eq!(got.to_bits(), want.to_bits(), "{isa:?} n{n}: bf16 dot");
                let (mut y1, mut y2) = (b.clone(), b.clone());
                // SAFETY: as above.
                unsafe { (simd::axpy_bf16(isa, &mut y1, 0.5, &bh), simd::axpy(isa, &mut y2, 0.5, &bw)) };
                assert_eq!(y1, y2, "{isa:?} n{n}: bf16 axpy");
            }
        }
        assert_eq!(dot(&[1.0, 2.0], &[3.0, 4.0]), 11.0);
        let mut y = [1.0f32; 3];
        axpy(&mut y, 2.0, &[1.0, 2.0, 3.0]);
        assert_eq!(y, [3.0, 5.0, 7.0]);
    }
}
