//! Rotary position embedding tables, computed the way transformers computes them.

use candle_core::Tensor;
use rayon::prelude::*;

use super::dense;
use super::ops::task_len;
use crate::error::{Error, Result};
use crate::shape::{ModelConfig, RopeScaling};

/// Inverse frequencies per rotary pair, after any scaling (f32, as transformers does).
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base: Vec<f32> = (0..d).step_by(2).map(|i| 1.0 / cfg.rope_theta.powf(i as f32 / d as f32)).collect();
    match cfg.rope_scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// `cos` and `sin` of every position × inverse frequency, `[max_positions, head_dim / 2]`
/// row-major each (the tables of both backends).
pub fn cos_sin(cfg: &ModelConfig) -> (Vec<f32>, Vec<f32>) {
    let freqs = inv_freq(cfg);
    let n = cfg.max_position_embeddings;
    let mut cos = Vec::with_capacity(n * freqs.len());
    let mut sin = Vec::with_capacity(n * freqs.len());
    for pos in 0..n {
        for f in &freqs {
            let angle = pos as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

/// Precomputed `cos` and `sin` for every position up to the model's context.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// `[max_positions, half]` row-major.
    cos: Vec<f32>,
    /// `[max_positions, half]` row-major.
    sin: Vec<f32>,
    /// Rotary pairs per head (`head_dim / 2`).
    half: usize,
}

impl RopeTables {
    /// Builds the tables for `cfg`.
    pub fn new(cfg: &ModelConfig) -> Self {
        let (cos, sin) = cos_sin(cfg);
        RopeTables { cos, sin, half: cfg.head_dim.div_ceil(2) }
    }

    /// Rotates `x` of shape `[tokens, heads, head_dim]` whose token `i` sits at `positions[i]`
    /// (the non-interleaved "rotate half" layout of Hugging Face Llama), in one pass over its
    /// storage with the same f32 operations as transformers' `x·cos + rotate_half(x)·sin`.
    pub fn apply(&self, x: &Tensor, positions: &[u32]) -> Result<Tensor> {
        let (tokens, heads, d) = x.dims3()?;
        let half = d / 2;
        if half != self.half || positions.len() != tokens {
            return Err(Error::device(format!(
                "RoPE of {} pairs for {} positions got {tokens} tokens of head_dim {d}",
                self.half,
                positions.len()
            )));
        }
        if let Some(&pos) = positions.iter().find(|&&p| (p as usize + 1) * half > self.cos.len()) {
            return Err(Error::device(format!("RoPE position {pos} is past the model's context")));
        }
        let row = (heads * d).max(1);
        let mut out = vec![0f32; tokens * heads * d];
        // A prefill's tokens are split between the compute threads, a decode step's stay on one.
        let per_task = task_len(out.len(), row);
        dense::with_rows(x, |xs| {
            out.par_chunks_mut(per_task)
                .zip(xs.par_chunks(per_task))
                .zip(positions.par_chunks(per_task / row))
                .for_each(|((out, xs), positions)| {
                    for ((xt, ot), &pos) in xs.chunks_exact(row).zip(out.chunks_exact_mut(row)).zip(positions) {
                        let at = pos as usize * half;
                        let (cos, sin) = (&self.cos[at..at + half], &self.sin[at..at + half]);
                        for (xh, oh) in xt.chunks_exact(d).zip(ot.chunks_exact_mut(d)) {
                            let (x1, x2) = xh.split_at(half);
                            let (o1, o2) = oh.split_at_mut(half);
                            for j in 0..half {
                                o1[j] = x1[j] * cos[j] - x2[j] * sin[j];
                                o2[j] = x2[j] * cos[j] + x1[j] * sin[j];
                            }
                        }
                    }
                })
        })?;
        Ok(Tensor::from_vec(out, (tokens, heads, d), x.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused rotation equals transformers' formula written with tensor ops.
    #[test]
    fn fused_rotation_matches_rotate_half() {
        let (t, h, d, positions) = (3, 2, 8, 20);
        let angle = |i: usize| (i as f32 * 0.37).sin();
        let rope = RopeTables {
            cos: (0..positions * d / 2).map(|i| angle(i).cos()).collect(),
            sin: (0..positions * d / 2).map(|i| angle(i).sin()).collect(),
            half: d / 2,
        };
        let x: Vec<f32> = (0..t * h * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let x = Tensor::from_vec(x, (t, h, d), &Device::Cpu).expect("x");
        let positions = [0u32, 5, 17];
        let got = rope.apply(&x, &positions).expect("rope");
        let half = d / 2;
        let table = |v: &[f32]| {
            let rows: Vec<f32> =
                positions.iter().flat_map(|&p| v[p as usize * half..(p as usize + 1) * half].to_vec()).collect();
            Tensor::from_vec(rows, (t, 1, half), &Device::Cpu).expect("table")
        };
        let (cos, sin) = (table(&rope.cos), table(&rope.sin));
        let (x1, x2) = (x.narrow(2, 0, half).expect("x1"), x.narrow(2, half, half).expect("x2"));
        let o1 = (x1.broadcast_mul(&cos).expect("m") - x2.broadcast_mul(&sin).expect("m")).expect("s");
        let o2 = (x2.broadcast_mul(&cos).expect("m") + x1.broadcast_mul(&sin).expect("m")).expect("a");
        let want = Tensor::cat(&[o1, o2], 2).expect("cat");
        let (got, want): (Vec<f32>, Vec<f32>) =
            (got.flatten_all().expect("f").to_vec1().expect("v"), want.flatten_all().expect("f").to_vec1().expect("v"));
        assert_eq!(got, want, "bit for bit");
        assert!(rope.apply(&x, &positions[..2]).is_err(), "a position per token");
        assert!(rope.apply(&x, &[0, 1, 20]).is_err(), "a position past the table is an error");
    }
}
