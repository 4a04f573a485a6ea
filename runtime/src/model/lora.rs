//! Applying each sequence's LoRA adapter inside the batched forward pass.

use std::cell::RefCell;

use openlora_kernels::lora::{Dims, LoraModuleView, PagePool, Segment, bgmv, sgmv};
use rayon::prelude::*;

use crate::shape::Proj;

/// An adapter placed in the page pool, as the LoRA op reads it (the pager places adapters;
/// the model only reads where their pages are).
pub trait PlacedAdapter: Sync {
    /// The kernel's view of one projection's weights, if the adapter has it.
    fn view(&self, layer: usize, proj: Proj) -> Option<LoraModuleView<'_>>;

    /// The placement itself, for a backend that knows the pager's type (a device mirror).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Which rows of a flat batch use which resident adapter, and the pool holding them.
pub struct LoraPlan<'a> {
    pool: Option<PagePool<'a>>,
    /// `(first row, rows, adapter)` per sequence.
    spans: Vec<(usize, usize, Option<&'a dyn PlacedAdapter>)>,
    /// Every sequence contributes one row: use the gathered (BGMV) schedule.
    decode_only: bool,
    /// Per sequence: Σ|adapter delta| and Σ|base output| over its adapted projections.
    shares: RefCell<Vec<AdapterShare>>,
    /// Buffers reused by every projection of the step: the views of the projection's modules
    /// per sequence, the SGMV segments, the base outputs of the adapted rows and where each
    /// sequence's rows lie (to measure).
    scratch: RefCell<Scratch<'a>>,
}

/// [`LoraPlan`]'s per-step buffers.
#[derive(Default)]
struct Scratch<'a> {
    views: Vec<Option<LoraModuleView<'a>>>,
    segments: Vec<Segment<'a>>,
    base: Vec<f32>,
    /// Per sequence, if adapted: (first row in the batch, rows, start of its rows in `base`).
    rows: Vec<Option<(usize, usize, usize)>>,
}

/// How much of one sequence's adapted projection outputs its adapter produced in one step:
/// the L1 norm of the LoRA deltas and of the base projections they were added to.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AdapterShare {
    /// Σ |Δy| over the sequence's rows of every projection its adapter touches.
    pub delta_l1: f64,
    /// Σ |W·x| over the same rows and projections.
    pub base_l1: f64,
}

impl AdapterShare {
    /// Adds another step's figures.
    pub fn add(&mut self, other: AdapterShare) {
        self.delta_l1 += other.delta_l1;
        self.base_l1 += other.base_l1;
    }

    /// The adapter's share of the output, in millionths: Σ|Δy| / (Σ|W·x| + Σ|Δy|).
    pub fn ppm(&self) -> u32 {
        let total = self.delta_l1 + self.base_l1;
        if total > 0.0 { (self.delta_l1 / total * 1e6).round().min(1e6) as u32 } else { 0 }
    }
}

impl<'a> LoraPlan<'a> {
    /// A plan for sequences laid out as `spans`; `pool` may be `None` when no sequence has an adapter.
    pub fn new(pool: Option<PagePool<'a>>, spans: Vec<(usize, usize, Option<&'a dyn PlacedAdapter>)>) -> Self {
        let decode_only = spans.iter().all(|s| s.1 == 1);
        let shares = RefCell::new(vec![AdapterShare::default(); spans.len()]);
        LoraPlan { pool, spans, decode_only, shares, scratch: RefCell::default() }
    }

    /// Whether any sequence carries an adapter.
    pub fn is_active(&self) -> bool {
        self.pool.is_some() && self.spans.iter().any(|s| s.2.is_some())
    }

    /// Adds every row's adapter delta for projection `proj` of layer `layer` to `y = x · Wᵀ`
    /// (`x: [rows, in_dim]`, `y: [rows, out_dim]`, row-major), in place.
    pub fn apply(&self, layer: usize, proj: Proj, x: &[f32], y: &mut [f32], in_dim: usize, out_dim: usize) {
        let Some(pool) = self.pool else { return };
        let mut scratch = self.scratch.borrow_mut();
        let Scratch { views, segments, base, rows } = &mut *scratch;
        views.clear();
        views.extend(self.spans.iter().map(|s| s.2.and_then(|a| a.view(layer, proj))));
        if views.iter().all(Option::is_none) {
            return;
        }
        // Only the adapted sequences' rows are kept to measure, in batch order.
        base.clear();
        for (&(start, len, _), view) in self.spans.iter().zip(views.iter()) {
            if view.is_some() {
                base.extend_from_slice(&y[start * out_dim..(start + len) * out_dim]);
            }
        }
        let d = Dims { in_dim, out_dim };
        if self.decode_only {
            bgmv(pool, x, y, d, views);
        } else {
            segments.clear();
            segments.extend(self.spans.iter().zip(views.iter()).map(|(&(start, len, _), m)| Segment {
                start,
                len,
                module: *m,
            }));
            sgmv(pool, x, y, d, segments);
        }
        self.measure(views, base, rows, y, out_dim);
    }

    /// Accumulates each adapted sequence's delta and base L1 norms for this projection, from
    /// the adapted rows' base outputs (`base`, in batch order) and the outputs now in `ys`.
    fn measure(
        &self,
        views: &[Option<LoraModuleView<'_>>],
        base: &[f32],
        rows: &mut Vec<Option<(usize, usize, usize)>>,
        ys: &[f32],
        out_dim: usize,
    ) {
        // Each adapted sequence's rows in `base`, in batch order.
        let mut at = 0;
        rows.clear();
        rows.extend(self.spans.iter().zip(views).map(|(&(start, len, _), view)| {
            view.as_ref().map(|_| {
                at += len * out_dim;
                (start, len, at - len * out_dim)
            })
        }));
        // One task per sequence (each sums its own rows in order, so the figures do not depend
        // on the threads); the other threads would idle through a serial loop.
        let mut shares = self.shares.borrow_mut();
        shares.par_iter_mut().zip(rows.par_iter()).for_each(|(share, rows)| {
            let Some((start, len, at)) = *rows else { return };
            let b = &base[at..at + len * out_dim];
            let a = &ys[start * out_dim..(start + len) * out_dim];
            for (b, a) in b.chunks(out_dim).zip(a.chunks(out_dim)) {
                let (base_l1, delta_l1) = openlora_kernels::vec::l1_base_and_delta(b, a);
                share.base_l1 += base_l1;
                share.delta_l1 += delta_l1;
            }
        });
    }

    /// Each sequence's measured adapter share in this step, in batch order.
    pub fn shares(self) -> Vec<AdapterShare> {
        self.shares.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::AdapterShare;

    #[test]
    fn share_is_delta_over_total() {
        let mut s = AdapterShare::default();
        assert_eq!(s.ppm(), 0, "no adapter, no share");
        s.add(AdapterShare { delta_l1: 1.0, base_l1: 3.0 });
        assert_eq!(s.ppm(), 250_000);
        s.add(AdapterShare { delta_l1: 1.0, base_l1: 0.0 });
        assert_eq!(s.ppm(), 400_000);
    }
}
