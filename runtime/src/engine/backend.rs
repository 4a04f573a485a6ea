//! What the engine steps: a model backend that owns the weights and the KV storage. The
//! scheduler above it is the same on every device; [`CpuBackend`] runs on the host and, with
//! the `cuda` feature, [`crate::gpu::backend::GpuBackend`] on a GPU.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::lora::AdapterShare;
use crate::model::{BlockPool, KvDType, LoadedModel, LogitRows, PagedKvCache, SeqBatch};
use crate::pager::AdapterPager;

/// What the engine needs from a step to choose a sequence's next token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// The most likely token: a device may choose it and send back only its id.
    Argmax,
    /// The whole logits row of the last new token (the host sampler, log-probabilities).
    Logits,
}

/// A sequence's result of one step, as its [`Pick`] asked (a backend may always give logits).
#[derive(Debug, Clone, PartialEq)]
pub enum StepRow {
    /// The most likely next token.
    Token(u32),
    /// The logits of the last new token.
    Logits(Vec<f32>),
}

/// What one step gives back, per sequence in batch order.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// Its next token or its logits.
    pub rows: Vec<StepRow>,
    /// Its adapter's measured share of the adapted projections' output.
    pub shares: Vec<AdapterShare>,
    /// Time spent bringing its adapter onto the device for this step (a GPU's upload; empty
    /// when nothing was brought).
    pub adapter_load: Vec<std::time::Duration>,
}

/// A device the engine can run steps on.
pub trait Backend: Send {
    /// Where it runs, for logs ("cpu", "cuda:0 NVIDIA H100 …").
    fn describe(&self) -> String;

    /// The KV pool's block bookkeeping.
    fn kv(&self) -> &BlockPool;

    /// The KV pool's block bookkeeping, to hand out or take back blocks.
    fn kv_mut(&mut self) -> &mut BlockPool;

    /// Runs one step: every sequence's new tokens, with the adapter it leases from `pager`'s
    /// active pool, giving back what `picks` (one per sequence) asks. Reserves the KV blocks a
    /// sequence lacks and marks its new tokens stored.
    fn step(&mut self, batch: &mut [SeqBatch<'_>], picks: &[Pick], pager: &AdapterPager) -> Result<StepOutput>;

    /// Why the device can run no more steps (a sticky device error), if that happened.
    fn fault(&self) -> Option<String> {
        None
    }
}

/// The host backend: the f32 decoder of [`crate::model::Llama`] and a host KV pool.
pub struct CpuBackend {
    model: Arc<LoadedModel>,
    kv: PagedKvCache,
}

impl CpuBackend {
    /// A backend for `model` (loaded with its CPU weights) with a KV pool of `kv_bytes` keeping
    /// keys and values in `kv_dtype`.
    pub fn new(model: Arc<LoadedModel>, kv_bytes: usize, kv_dtype: KvDType) -> Result<Self> {
        model.llama()?;
        let kv = PagedKvCache::with_bytes(model.config(), kv_bytes, kv_dtype);
        if kv.total_blocks() == 0 {
            return Err(Error::config("server configuration", "memory.kv_cache_bytes", "too small for one KV block"));
        }
        Ok(CpuBackend { model, kv })
    }
}

impl Backend for CpuBackend {
    fn describe(&self) -> String {
        "cpu".into()
    }

    fn kv(&self) -> &BlockPool {
        self.kv.blocks()
    }

    fn kv_mut(&mut self) -> &mut BlockPool {
        self.kv.blocks_mut()
    }

    fn step(&mut self, batch: &mut [SeqBatch<'_>], _: &[Pick], pager: &AdapterPager) -> Result<StepOutput> {
        let pool = batch.iter().any(|s| s.adapter.is_some()).then(|| pager.pool());
        if pool.as_ref().is_some_and(|p| !p.place().on_host()) {
            return Err(Error::device("the adapter pool lives on a device: the CPU backend needs it on the host"));
        }
        let (logits, shares) = self.model.llama()?.forward_measured(
            &mut self.kv,
            batch,
            LogitRows::Last,
            pool.as_ref().map(|p| p.view()),
        )?;
        let rows = logits.to_vec2::<f32>()?.into_iter().map(StepRow::Logits).collect();
        Ok(StepOutput { rows, shares, adapter_load: Vec::new() })
    }
}
