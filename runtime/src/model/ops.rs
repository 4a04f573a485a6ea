//! The tensor operations of a Llama decoder on candle-core, matching transformers' numerics.

use candle_core::{D, DType, Tensor};

use crate::error::Result;

/// `x · wᵀ` for `x: [rows, in]` and a weight `w: [out, in]` as stored by Hugging Face.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

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

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// Causal grouped-query attention of one sequence.
///
/// `q: [t, heads, head_dim]` holds the queries of the sequence's `t` new tokens, which sit at
/// positions `start..start + t`; `k`, `v: [kv_heads, start + t, head_dim]` hold every key and
/// value so far. Query heads are grouped over key/value heads without copying the cache.
/// Returns `[t, heads * head_dim]`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, start: usize) -> Result<Tensor> {
    let (t, nh, hd) = q.dims3()?;
    let (nkv, s, _) = k.dims3()?;
    let g = nh / nkv;
    let q = q.transpose(0, 1)?.contiguous()?.reshape((nkv, g * t, hd))?;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if t > 1 {
        let mask: Vec<f32> =
            (0..t).flat_map(|i| (0..s).map(move |j| if j > start + i { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (t, s), q.device())?;
        scores = scores.reshape((nkv, g, t, s))?.broadcast_add(&mask)?.reshape((nkv, g * t, s))?;
    }
    let probs = softmax_last(&scores)?;
    let out = probs.matmul(v)?; // [nkv, g * t, hd]
    let out = out.reshape((nh, t, hd))?.transpose(0, 1)?.contiguous()?.reshape((t, nh * hd))?;
    debug_assert_eq!(out.dtype(), DType::F32);
    Ok(out)
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

    #[test]
    fn single_key_attention_returns_its_value() {
        // One token, two query heads over one KV head: output is the value, repeated per head.
        let q = t(&[0.3, -1.0, 2.0, 0.5], &[1, 2, 2]);
        let k = t(&[1.0, 1.0], &[1, 1, 2]);
        let v = t(&[7.0, -3.0], &[1, 1, 2]);
        let out: Vec<f32> =
            causal_attention(&q, &k, &v, 0).expect("op").flatten_all().expect("f").to_vec1().expect("v");
        assert_eq!(out, vec![7.0, -3.0, 7.0, -3.0]);
    }

    #[test]
    fn prefill_is_causal() {
        // Two tokens: the first may only see itself, so its output is the first value.
        let q = t(&[1.0, 0.0, 1.0, 0.0], &[2, 1, 2]);
        let k = t(&[1.0, 0.0, 1.0, 0.0], &[1, 2, 2]);
        let v = t(&[1.0, 1.0, 3.0, 5.0], &[1, 2, 2]);
        let out = causal_attention(&q, &k, &v, 0).expect("op").to_vec2::<f32>().expect("v");
        assert_eq!(out[0], vec![1.0, 1.0]);
        assert!((out[1][0] - 2.0).abs() < 1e-6 && (out[1][1] - 3.0).abs() < 1e-6);
    }
}
