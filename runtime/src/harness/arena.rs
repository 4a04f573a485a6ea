//! Adapters in memory on the device without a pager: the pager's own page layout in a host
//! arena, mirrored by a [`GpuAdapters`] (the benchmark's and the parity check's adapters).

use crate::adapters::LoraWeights;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::gpu::lora::GpuAdapters;
use crate::pager::pool::{PageAllocator, PoolData, PoolPlace, ResidentAdapter};

/// Adapters made or loaded in memory, placed by the pager's own page layout into a host arena
/// and mirrored on the device: the serving path's upload, without a pager (the benchmark and
/// the parity check use it).
pub struct AdapterArena {
    alloc: PageAllocator,
    host: PoolData,
    /// The device mirror.
    pub device: GpuAdapters,
}

impl AdapterArena {
    /// An arena of `pages` pages of `page_elems` values with `banks` device banks.
    pub fn new(gpu: &Gpu, layers: usize, pages: usize, page_elems: usize, banks: usize) -> Result<Self> {
        let (alloc, host) = PageAllocator::new(pages, page_elems, PoolPlace::Device);
        Ok(AdapterArena { alloc, host, device: GpuAdapters::new(gpu, layers, pages, page_elems, banks, pages)? })
    }

    /// Gives `w` free pages of the arena (not yet on the device).
    pub fn place(&mut self, w: LoraWeights) -> Result<ResidentAdapter> {
        let w = std::sync::Arc::new(w);
        self.alloc.place(&mut self.host, &w).ok_or_else(|| {
            Error::device(format!(
                "the adapter needs {} pages; {} are free",
                self.alloc.pages_needed(&w),
                self.alloc.free_pages()
            ))
        })
    }

    /// Frees an adapter's pages in the host arena.
    pub fn release(&mut self, r: &ResidentAdapter) {
        self.alloc.release(r);
    }

    /// The device bank of `r`, uploading it if needed ([`GpuAdapters::bank_for`]).
    pub fn bank_for(&mut self, gpu: &Gpu, r: &ResidentAdapter, busy: &[u32]) -> Result<u32> {
        self.device.bank_for(gpu, r, &self.host, busy)
    }
}
