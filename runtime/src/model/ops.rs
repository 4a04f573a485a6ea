//! The tensor operations of a Llama decoder besides its projections, matching transformers'
//! numerics: the norm and the gated activation in one pass over the tensors' storage, the rest
//! on candle-core.

use candle_core::{D, Tensor};
use rayon::prelude::*;

use super::dense;
use crate::error::Result;

/// Elements below which an elementwise op runs on the calling thread alone (a small batch's
/// rows); above, rows are split between rayon's threads (a prefill's megabytes).
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// Elements per task of an op over `len` elements in rows of `width`: whole rows, all of
/// them in one task below [`PARALLEL_MIN_ELEMS`].
pub(super) fn task_len(len: usize, width: usize) -> usize {
    let width = width.max(1);
    let rows = if len < PARALLEL_MIN_ELEMS { len / width } else { PARALLEL_MIN_ELEMS / 4 / width };
    rows.max(1) * width
}

/// Root-mean-square layer norm over the last dimension, then scaled by `weight`: one pass over
/// the rows' storage, sums in f32 as transformers' `LlamaRMSNorm` computes them.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let width = x.dim(D::Minus1)?;
    let mut out = vec![0f32; x.elem_count()];
    let task = task_len(out.len(), width);
    dense::with_rows(weight, |w| {
        dense::with_rows(x, |xs| {
            out.par_chunks_mut(task).zip(xs.par_chunks(task)).for_each(|(out, xs)| {
                for (row, o) in xs.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
                    let mean = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
                    let inv = 1.0 / (mean + eps as f32).sqrt();
                    for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
                        *o = v * inv * w;
                    }
                }
            })
        })
    })??;
    Ok(Tensor::from_vec(out, x.shape(), x.device())?)
}

/// `silu(gate) * up`, the gated MLP activation, in one pass.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let mut out = vec![0f32; gate.elem_count()];
    let task = task_len(out.len(), gate.dim(D::Minus1)?);
    dense::with_rows(gate, |g| {
        dense::with_rows(up, |u| {
            out.par_chunks_mut(task).zip(g.par_chunks(task).zip(u.par_chunks(task))).for_each(|(out, (g, u))| {
                for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            })
        })
    })??;
    Ok(Tensor::from_vec(out, gate.shape(), gate.device())?)
}

/// `y += r`, element by element (a residual stream added to a projection's output), split
/// between the compute threads as the other ops are.
pub fn add_assign(y: &mut [f32], r: &[f32]) -> Result<()> {
    if y.len() != r.len() {
        return Err(crate::error::Error::device(format!("adding {} elements to {}", r.len(), y.len())));
    }
    let task = task_len(y.len(), 1);
    y.par_chunks_mut(task).zip(r.par_chunks(task)).for_each(|(y, r)| y.iter_mut().zip(r).for_each(|(y, r)| *y += r));
    Ok(())
}

/// `a + b` for tensors of one shape, on the compute threads (never candle's own pool).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        return Err(crate::error::Error::device(format!("adding {:?} to {:?}", b.shape(), a.shape())));
    }
    let mut out = dense::with_rows(a, <[f32]>::to_vec)?;
    dense::with_rows(b, |bs| add_assign(&mut out, bs))??;
    Ok(Tensor::from_vec(out, a.shape(), a.device())?)
}

/// `gelu(gate) * up` with GELU's tanh approximation (Gemma's GeGLU, `gelu_pytorch_tanh`).
pub fn gelu_tanh_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.gelu()? * up)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).expect("tensor")
    }

    /// A prefill-sized tensor, split between threads, gives each row exactly what that row
    /// alone (one thread) gives.
    #[test]
    fn split_between_threads_the_rows_are_unchanged() {
        let (rows, width) = (97, 1024);
        let v: Vec<f32> = (0..rows * width).map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0).collect();
        let x = t(&v, &[rows, width]);
        let u = (x.clone() * 0.5).expect("scaled");
        let w = t(&v[..width], &[width]);
        let norm = rms_norm(&x, &w, 1e-6).expect("op");
        let act = silu_mul(&x, &u).expect("op");
        for r in [0, 41, rows - 1] {
            let row = |m: &Tensor| m.narrow(0, r, 1).expect("row");
            let alone = rms_norm(&row(&x), &w, 1e-6).expect("op");
            assert_eq!(row(&norm).to_vec2::<f32>().expect("v"), alone.to_vec2::<f32>().expect("v"), "norm row {r}");
            let alone = silu_mul(&row(&x), &row(&u)).expect("op");
            assert_eq!(row(&act).to_vec2::<f32>().expect("v"), alone.to_vec2::<f32>().expect("v"), "silu row {r}");
        }
    }

    #[test]
    fn rms_norm_matches_formula() {
        let x = t(&[1.0, 2.0, 3.0, 4.0], &[1, 4]);
        let w = t(&[1.0, 0.5, 2.0, 1.0], &[4]);
        let got: Vec<f32> = rms_norm(&x, &w, 1e-6).expect("op").flatten_all().expect("f").to_vec1().expect("v");
        let rms = ((1.0f32 + 4.0 + 9.0 + 16.0) / 4.0 + 1e-6).sqrt();
        let want = [1.0 / rms, 1.0 / rms, 6.0 / rms, 4.0 / rms];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
