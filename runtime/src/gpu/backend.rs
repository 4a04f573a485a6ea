//! The engine's backend on a GPU: [`GpuLlama`] with its device KV cache and a device mirror of
//! the pager's active adapter pool, sized together from one device memory budget.

use std::sync::Arc;

use super::lora::GpuAdapters;
use super::model::{GpuKv, GpuLlama, GpuSeq};
use super::step::Step;
use super::{Gpu, cuda_err};
use crate::engine::backend::{Backend, Pick, StepOutput, StepRow};
use crate::error::{Error, Result};
use crate::model::llama::reserve_batch;
use crate::model::{BlockPool, LoadedModel, SeqBatch};
use crate::pager::AdapterPager;
use crate::pager::pool::ResidentAdapter;

/// Device memory kept free for a step's activations, cuBLAS workspaces and the logits when the
/// budget is taken from what is free.
const HEADROOM: f64 = 0.10;

/// The engine's GPU backend.
pub struct GpuBackend {
    gpu: Gpu,
    llama: GpuLlama,
    kv: GpuKv,
    adapters: GpuAdapters,
    /// Set when a step failed and the device no longer answers (a sticky CUDA error).
    fault: Option<String>,
}

/// How a device memory budget was split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceBudget {
    /// Bytes of the adapter pool's mirror.
    pub adapter_pool_bytes: usize,
    /// KV blocks the rest holds.
    pub kv_blocks: usize,
}

impl DeviceBudget {
    /// Splits `budget` bytes: the adapter pool (`pool` bytes) first, the KV cache (blocks of
    /// `kv_block_bytes`) in the rest.
    pub fn split(budget: usize, pool: usize, kv_block_bytes: usize) -> Result<Self> {
        let kv_blocks = budget.saturating_sub(pool) / kv_block_bytes.max(1);
        if kv_blocks == 0 {
            return Err(Error::config(
                "server configuration",
                "memory.device_bytes",
                format!(
                    "{budget} bytes of device memory leave no room for one KV block after the {pool}-byte adapter pool"
                ),
            ));
        }
        Ok(DeviceBudget { adapter_pool_bytes: pool, kv_blocks })
    }
}

impl GpuBackend {
    /// Opens `cuda:ordinal`, uploads `model`'s weights (bf16) and sizes the adapter mirror (as
    /// `pager`'s active pool, which must count bf16 values) and the KV cache from
    /// `device_bytes`, or from 90% of the memory free once the weights are in. `banks` is how
    /// many adapters one step may mix.
    pub fn open(
        ordinal: usize,
        model: &Arc<LoadedModel>,
        pager: &AdapterPager,
        device_bytes: Option<usize>,
        banks: usize,
    ) -> Result<Self> {
        let gpu = Gpu::open(ordinal)?;
        let llama = GpuLlama::load(&gpu, &model.folder)?;
        Self::with_model(gpu, llama, pager, device_bytes, banks)
    }

    /// [`GpuBackend::open`] with the device opened and the decoder on it already (the
    /// benchmark's random Llama-7B).
    pub fn with_model(
        gpu: Gpu,
        llama: GpuLlama,
        pager: &AdapterPager,
        device_bytes: Option<usize>,
        banks: usize,
    ) -> Result<Self> {
        gpu.synchronize()?;
        let cfg = &llama.config().clone();
        let budget = match device_bytes {
            Some(b) => b,
            None => {
                let (free, _) = gpu.ctx.mem_get_info().map_err(cuda_err)?;
                (free as f64 * (1.0 - HEADROOM)) as usize
            }
        };
        let (pages, page_elems) = (pager.pool_pages(), pager.page_elems());
        let pool = GpuAdapters::device_bytes(cfg.num_layers, pages, page_elems, banks, pages);
        let split = DeviceBudget::split(budget, pool, GpuKv::block_bytes(cfg))?;
        let kv = GpuKv::new(&gpu, cfg, split.kv_blocks)?;
        let adapters = GpuAdapters::new(&gpu, cfg.num_layers, pages, page_elems, banks, pages)?;
        Ok(GpuBackend { gpu, llama, kv, adapters, fault: None })
    }
}

impl Backend for GpuBackend {
    fn describe(&self) -> String {
        let i = &self.gpu.info;
        format!("cuda:{} {} (compute capability {}.{})", i.ordinal, i.name, i.capability.0, i.capability.1)
    }

    fn kv(&self) -> &BlockPool {
        &self.kv.blocks
    }

    fn kv_mut(&mut self) -> &mut BlockPool {
        &mut self.kv.blocks
    }

    fn step(&mut self, batch: &mut [SeqBatch<'_>], picks: &[Pick], pager: &AdapterPager) -> Result<StepOutput> {
        let result = self.run_step(batch, picks, pager);
        if let Err(e) = &result
            && self.fault.is_none()
            && self.gpu.synchronize().is_err()
        {
            // The step's error left the context unusable: every later step would fail too.
            self.fault = Some(format!("{}: {e}", self.describe()));
        }
        result
    }

    fn fault(&self) -> Option<String> {
        self.fault.clone()
    }
}

impl GpuBackend {
    fn run_step(&mut self, batch: &mut [SeqBatch<'_>], picks: &[Pick], pager: &AdapterPager) -> Result<StepOutput> {
        // The engine thread is not the one that opened the device; cuBLAS needs its context.
        self.gpu.ctx.bind_to_thread().map_err(cuda_err)?;
        reserve_batch(&mut self.kv.blocks, batch)?;
        let mut banks: Vec<Option<u32>> = vec![None; batch.len()];
        let mut adapter_load = Vec::new();
        if batch.iter().any(|s| s.adapter.is_some()) {
            let host = pager.pool();
            let mut busy = Vec::new();
            adapter_load = vec![std::time::Duration::ZERO; batch.len()];
            for (i, seq) in batch.iter().enumerate() {
                let Some(r) = seq.adapter else { continue };
                let r = r
                    .as_any()
                    .downcast_ref::<ResidentAdapter>()
                    .ok_or_else(|| Error::device("an adapter not placed by the pager"))?;
                let (t0, before) = (std::time::Instant::now(), self.adapters.uploads);
                let bank = self.adapters.bank_for(&self.gpu, r, &host, &busy)?;
                if self.adapters.uploads > before {
                    adapter_load[i] = t0.elapsed();
                    pager.metrics().load_seconds.with_label_values(&["device"]).observe(adapter_load[i].as_secs_f64());
                }
                busy.push(bank);
                banks[i] = Some(bank);
            }
        }
        let seqs: Vec<GpuSeq<'_>> = batch
            .iter()
            .zip(&banks)
            .map(|(s, &adapter)| GpuSeq { tokens: s.tokens, start: s.kv.len(), blocks: s.kv.blocks(), adapter })
            .collect();
        let mut step = self.llama.forward(&self.gpu, &mut self.kv, Some(&self.adapters), &seqs, false)?;
        let rows = pick_rows(&self.gpu, &mut step, picks, batch.len(), self.llama.config().vocab_size)?;
        let shares = std::mem::take(&mut step.shares);
        drop(step);
        for seq in batch.iter_mut() {
            BlockPool::commit(seq.kv, seq.tokens.len());
        }
        Ok(StepOutput { rows, shares, adapter_load })
    }
}

/// What each sequence asked of the step's last-row logits: the argmax chosen on the device
/// (only the ids come back), or the row itself (only those rows come back).
fn pick_rows(gpu: &Gpu, step: &mut Step<'_>, picks: &[Pick], seqs: usize, vocab: usize) -> Result<Vec<StepRow>> {
    let pick = |i: usize| picks.get(i).copied().unwrap_or(Pick::Logits);
    let ids = if (0..seqs).any(|i| pick(i) == Pick::Argmax) {
        step.sample(gpu, &vec![0.0; seqs], &vec![0; seqs])?
    } else {
        Vec::new()
    };
    // One copy for all the rows when several need their logits, else one row each.
    let wanted = (0..seqs).filter(|&i| pick(i) == Pick::Logits).count();
    let all = if wanted > 1 { Some(step.download_logits(gpu)?) } else { None };
    (0..seqs)
        .map(|i| match (pick(i), ids.get(i)) {
            (Pick::Argmax, Some(&id)) if (id as usize) < vocab => Ok(StepRow::Token(id)),
            // (Never outside the vocabulary; if it were, the host sampler decides from the row.)
            _ => match &all {
                Some(all) => Ok(StepRow::Logits(all[i * vocab..(i + 1) * vocab].to_vec())),
                None => step.download_row(gpu, i).map(StepRow::Logits),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_goes_to_the_pool_first_and_the_kv_cache_gets_the_rest() {
        let s = DeviceBudget::split(10_000, 2_000, 1_000).expect("fits");
        assert_eq!(s, DeviceBudget { adapter_pool_bytes: 2_000, kv_blocks: 8 });
        assert!(DeviceBudget::split(2_500, 2_000, 1_000).is_err(), "no room for one block");
    }
}
