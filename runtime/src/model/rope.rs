//! Rotary position embedding tables, computed the way transformers computes them.

use candle_core::{Device, Tensor};

use crate::error::Result;
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
    /// `[max_positions, head_dim / 2]`
    pub cos: Tensor,
    /// `[max_positions, head_dim / 2]`
    pub sin: Tensor,
}

impl RopeTables {
    /// Builds the tables for `cfg` on `device`.
    pub fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let (cos, sin) = cos_sin(cfg);
        let (n, half) = (cfg.max_position_embeddings, cfg.head_dim.div_ceil(2));
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, (n, half), device)?,
            sin: Tensor::from_vec(sin, (n, half), device)?,
        })
    }

    /// Rotates `x` of shape `[tokens, heads, head_dim]` whose token `i` sits at `positions[i]`
    /// (the non-interleaved "rotate half" layout of Hugging Face Llama).
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (_, _, d) = x.dims3()?;
        let half = d / 2;
        let cos = self.cos.index_select(positions, 0)?.unsqueeze(1)?;
        let sin = self.sin.index_select(positions, 0)?.unsqueeze(1)?;
        let x1 = x.narrow(2, 0, half)?;
        let x2 = x.narrow(2, half, half)?;
        let out1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let out2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[out1, out2], 2)?)
    }
}
