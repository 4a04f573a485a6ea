//! A per-sequence key/value cache held as contiguous tensors, one pair per layer.

use candle_core::Tensor;

use crate::error::Result;

/// Keys and values of one sequence, `[kv_heads, tokens, head_dim]` per layer.
#[derive(Clone)]
pub struct SeqKvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    committed: usize,
}

impl SeqKvCache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        SeqKvCache { layers: vec![None; num_layers], committed: 0 }
    }

    /// Tokens stored (the position of the next token).
    pub fn len(&self) -> usize {
        self.committed
    }

    /// Whether no token has been stored yet.
    pub fn is_empty(&self) -> bool {
        self.committed == 0
    }

    /// Appends a step's `k`, `v: [tokens, kv_heads, head_dim]` to layer `layer` and returns the
    /// layer's full keys and values, `[kv_heads, all_tokens, head_dim]`.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = k.transpose(0, 1)?.contiguous()?;
        let v = v.transpose(0, 1)?.contiguous()?;
        let (k, v) = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Marks the tokens appended by the step just run as part of the sequence.
    pub fn commit(&mut self) {
        if let Some(Some((k, _))) = self.layers.first() {
            self.committed = k.dims().get(1).copied().unwrap_or(0);
        }
    }
}
