//! Applying each sequence's LoRA adapter inside the batched forward pass.

use candle_core::Tensor;
use openlora_kernels::lora::{Dims, PagePool, Segment, bgmv, sgmv};

use super::llama::Proj;
use crate::error::Result;
use crate::pager::pool::ResidentAdapter;

/// Which rows of a flat batch use which resident adapter, and the pool holding them.
pub struct LoraPlan<'a> {
    pool: Option<PagePool<'a>>,
    /// `(first row, rows, adapter)` per sequence.
    spans: Vec<(usize, usize, Option<&'a ResidentAdapter>)>,
    /// Every sequence contributes one row: use the gathered (BGMV) schedule.
    decode_only: bool,
}

impl<'a> LoraPlan<'a> {
    /// A plan for sequences laid out as `spans`; `pool` may be `None` when no sequence has an adapter.
    pub fn new(pool: Option<PagePool<'a>>, spans: Vec<(usize, usize, Option<&'a ResidentAdapter>)>) -> Self {
        let decode_only = spans.iter().all(|s| s.1 == 1);
        LoraPlan { pool, spans, decode_only }
    }

    /// Whether any sequence carries an adapter.
    pub fn is_active(&self) -> bool {
        self.pool.is_some() && self.spans.iter().any(|s| s.2.is_some())
    }

    /// Adds every row's adapter delta for projection `proj` of layer `layer` to `y = x · Wᵀ`.
    pub fn apply(&self, layer: usize, proj: Proj, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let Some(pool) = self.pool else { return Ok(y) };
        let views: Vec<_> = self.spans.iter().map(|s| s.2.and_then(|a| a.view(layer, proj))).collect();
        if views.iter().all(Option::is_none) {
            return Ok(y);
        }
        let (rows, in_dim) = x.dims2()?;
        let (_, out_dim) = y.dims2()?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut ys: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let d = Dims { in_dim, out_dim };
        if self.decode_only {
            bgmv(pool, &xs, &mut ys, d, &views);
        } else {
            let segs: Vec<Segment<'_>> =
                self.spans.iter().zip(&views).map(|(&(start, len, _), m)| Segment { start, len, module: *m }).collect();
            sgmv(pool, &xs, &mut ys, d, &segs);
        }
        Ok(Tensor::from_vec(ys, (rows, out_dim), y.device())?)
    }
}
