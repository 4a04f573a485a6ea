//! The tensor operations of a Llama decoder on candle-core, matching transformers' numerics.

use candle_core::{D, DType, Tensor};

use crate::error::Result;

/// Root-mean-square layer norm over the last dimension, then scaled by `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(weight)?)
}

/// `silu(gate) * up`, the gated MLP activation.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// `gelu(gate) * up` with GELU's tanh approximation (Gemma's GeGLU, `gelu_pytorch_tanh`).
pub fn gelu_tanh_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.gelu()? * up)?)
}

/// The elements of a tensor, row-major, as f32.
pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).expect("tensor")
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
