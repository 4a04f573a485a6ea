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

#[cfg(test)]
mod tests {
    use super::*;

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
            }
        }
        assert_eq!(dot(&[1.0, 2.0], &[3.0, 4.0]), 11.0);
        let mut y = [1.0f32; 3];
        axpy(&mut y, 2.0, &[1.0, 2.0, 3.0]);
        assert_eq!(y, [3.0, 5.0, 7.0]);
    }
}
