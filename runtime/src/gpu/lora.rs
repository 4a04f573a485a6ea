//! Adapters on the GPU: a bf16 mirror of the pager's active pool, page for page (S-LoRA's
//! unified paging: one pool of fixed-size pages shared by every rank), per-slot page tables
//! and module descriptors, uploads on the copy stream, and the batched LoRA op: shrink then
//! expand, segmented (SGMV) for prefill and gathered (BGMV) for decode, with every row's
//! adapter and rank in one launch.
//!
//! The pager decides which adapters are active and which pages they hold; a *slot* here binds
//! one such placement (by [`ResidentAdapter::id`]) to its page table and descriptors on the
//! device. A placement is uploaded when it is first bound; a new placement in reused pages is a
//! new id, so a stale device copy is never read.

use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

use super::model::LoraRows;
use super::{Gpu, cuda_err, grid};
use crate::adapters::LoraWeights;
use crate::error::{Error, Result};
use crate::model::lora::AdapterShare;
use crate::pager::pool::{PageAllocator, PoolData, ResidentAdapter};

/// Modules an adapter can have per layer (the seven projections).
const PROJS: usize = 7;

/// What a slot holds.
#[derive(Debug, Clone, Copy)]
struct Bound {
    placement: u64,
    max_rank: usize,
    last_used: u64,
}

/// The device adapter pool.
pub struct GpuAdapters {
    pool: CudaSlice<bf16>,
    page_elems: usize,
    pages: usize,
    /// Page tables, `table_cap` entries per slot.
    tables: CudaSlice<u32>,
    table_cap: usize,
    /// Per module id (slot × layers × 7 + layer × 7 + projection): rank (0: absent), scale,
    /// and the offsets of its A and Bᵀ page tables in `tables`.
    ranks: CudaSlice<i32>,
    scales: CudaSlice<f32>,
    a_offsets: CudaSlice<u32>,
    bt_offsets: CudaSlice<u32>,
    modules_per_adapter: usize,
    slots: Vec<Option<Bound>>,
    clock: u64,
    /// Placements uploaded so far (each adapter load from the host pool).
    pub uploads: u64,
}

impl GpuAdapters {
    /// A mirror of a host pool of `pages` pages of `page_elems` values, with `slots` adapter
    /// slots of up to `table_cap` pages each, for a model of `layers` layers.
    pub fn new(
        gpu: &Gpu,
        layers: usize,
        pages: usize,
        page_elems: usize,
        slots: usize,
        table_cap: usize,
    ) -> Result<Self> {
        let modules = slots * layers * PROJS;
        Ok(GpuAdapters {
            pool: gpu.zeros::<bf16>(pages * page_elems)?,
            page_elems,
            pages,
            tables: gpu.zeros::<u32>(slots * table_cap)?,
            table_cap,
            ranks: gpu.zeros::<i32>(modules)?,
            scales: gpu.zeros::<f32>(modules)?,
            a_offsets: gpu.zeros::<u32>(modules)?,
            bt_offsets: gpu.zeros::<u32>(modules)?,
            modules_per_adapter: layers * PROJS,
            slots: vec![None; slots.max(1)],
            clock: 0,
            uploads: 0,
        })
    }

    /// Bytes of device memory a mirror of `pages` pages of `page_elems` values takes.
    pub fn pool_bytes(pages: usize, page_elems: usize) -> usize {
        pages * page_elems * 2
    }

    /// The widest rank of the adapter in `slot` (0 if empty).
    pub fn slot_rank(&self, slot: u32) -> usize {
        self.slots.get(slot as usize).copied().flatten().map_or(0, |b| b.max_rank)
    }

    /// The slot holding `resident`, binding (and uploading) it first if none does; the least
    /// recently used slot not named in `busy` (the step's other adapters) is reused.
    pub fn slot_for(&mut self, gpu: &Gpu, resident: &ResidentAdapter, host: &PoolData, busy: &[u32]) -> Result<u32> {
        self.clock += 1;
        if let Some(s) = self.slots.iter().position(|b| b.is_some_and(|b| b.placement == resident.id())) {
            if let Some(b) = &mut self.slots[s] {
                b.last_used = self.clock;
            }
            return Ok(s as u32);
        }
        let slot = (0..self.slots.len())
            .filter(|s| !busy.contains(&(*s as u32)))
            .min_by_key(|&s| self.slots[s].map_or(0, |b| b.last_used))
            .ok_or_else(|| {
                Error::Device(format!("more adapters in one step than the {} GPU slots", self.slots.len()))
            })?;
        self.bind(gpu, slot, resident, host)?;
        Ok(slot as u32)
    }

    /// Uploads `resident`'s pages from the host pool into the same pages of the device pool and
    /// points `slot` at them. The pages are converted to bf16 on the host, copied in one transfer
    /// on the copy stream and scattered there; the call returns once the copy is done, so the
    /// compute stream never reads a page before it is written.
    pub fn bind(&mut self, gpu: &Gpu, slot: usize, resident: &ResidentAdapter, host: &PoolData) -> Result<()> {
        let table = resident.pages();
        if slot >= self.slots.len() {
            return Err(Error::Device(format!("adapter slot {slot} is out of range ({} slots)", self.slots.len())));
        }
        if host.page_elems() != self.page_elems || table.iter().any(|&p| p as usize >= self.pages) {
            return Err(Error::Device("the adapter's pages do not fit the device pool's geometry".into()));
        }
        if table.len() > self.table_cap {
            return Err(Error::Device(format!(
                "the adapter holds {} pages; a GPU slot holds {}",
                table.len(),
                self.table_cap
            )));
        }
        self.slots[slot] = None;
        let mut staging: Vec<bf16> = Vec::with_capacity(table.len() * self.page_elems);
        for &p in table {
            staging.extend(host.page(p).iter().map(|&v| bf16::from_f32(v)));
        }
        let mpa = self.modules_per_adapter;
        let (mut ranks, mut scales, mut a_off, mut bt_off) =
            (vec![0i32; mpa], vec![0f32; mpa], vec![0u32; mpa], vec![0u32; mpa]);
        let first = slot * self.table_cap;
        for m in resident.modules() {
            let id = m.layer * PROJS + m.proj;
            if id >= mpa {
                return Err(Error::Device(format!("the adapter has a module in layer {} the model lacks", m.layer)));
            }
            ranks[id] = m.rank as i32;
            scales[id] = m.scale;
            a_off[id] = (first + m.a_first) as u32;
            bt_off[id] = (first + m.bt_first) as u32;
        }
        let cs = &gpu.copy_stream;
        let staged = cs.clone_htod(&staging).map_err(cuda_err)?;
        let dev_table = cs.clone_htod(table).map_err(cuda_err)?;
        if !table.is_empty() {
            let pe_i = self.page_elems as i32;
            let mut b = cs.launch_builder(gpu.kernel("scatter_pages_bf16")?);
            b.arg(&staged).arg(&mut self.pool).arg(&dev_table).arg(&pe_i);
            // SAFETY: reads table.len() staged pages and writes the pool pages the table names,
            // each checked above to be below the pool's page count.
            unsafe { b.launch(grid((table.len() as u32, 1), 256, 0)) }.map_err(cuda_err)?;
            cs.memcpy_htod(table, &mut self.tables.slice_mut(first..first + table.len())).map_err(cuda_err)?;
        }
        let mods = slot * mpa..(slot + 1) * mpa;
        cs.memcpy_htod(&ranks, &mut self.ranks.slice_mut(mods.clone())).map_err(cuda_err)?;
        cs.memcpy_htod(&scales, &mut self.scales.slice_mut(mods.clone())).map_err(cuda_err)?;
        cs.memcpy_htod(&a_off, &mut self.a_offsets.slice_mut(mods.clone())).map_err(cuda_err)?;
        cs.memcpy_htod(&bt_off, &mut self.bt_offsets.slice_mut(mods)).map_err(cuda_err)?;
        // The staging buffers must outlive the copy, and compute must not read the slot early.
        cs.synchronize().map_err(cuda_err)?;
        self.clock += 1;
        self.uploads += 1;
        self.slots[slot] =
            Some(Bound { placement: resident.id(), max_rank: resident.max_rank(), last_used: self.clock });
        Ok(())
    }

    /// Adds every row's adapter delta for module `module` (layer × 7 + projection) to
    /// `y = x · Wᵀ`: shrink into `tmp` (f32, `[rows, rows.max_rank]`), then expand into `y`,
    /// adding each sequence's Σ|W·x| and Σ|Δy| over the rows it adapts to `sums` (the measure).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply(
        &self,
        gpu: &Gpu,
        rows: &LoraRows<'_>,
        module: usize,
        x: &CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
        tmp: &mut CudaSlice<f32>,
        sums: &mut ShareSums,
        (out_dim, in_dim): (usize, usize),
    ) -> Result<()> {
        let s = &gpu.stream;
        let (module, mpa) = (module as i32, self.modules_per_adapter as i32);
        let (in_i, out_i, mr, pe) = (in_dim as i32, out_dim as i32, rows.max_rank as i32, self.page_elems as i32);
        let out_blocks = out_dim.div_ceil(256) as u32;
        // SAFETY (both launches): x is rows × in_dim, y rows × out_dim, tmp rows × max_rank;
        // the descriptors index only the slot tables and pages written by `place`.
        if rows.decode {
            {
                let mut b = s.launch_builder(gpu.kernel("lora_shrink_bgmv_bf16")?);
                b.arg(x).arg(&mut *tmp).arg(&self.pool).arg(&self.tables).arg(rows.row_adapter).arg(&module).arg(&mpa);
                b.arg(&self.ranks).arg(&self.a_offsets).arg(&in_i).arg(&mr).arg(&pe);
                // SAFETY: the buffers passed were sized above for the rows and widths given.
                unsafe { b.launch(grid((rows.rows as u32, rows.max_rank as u32), 128, 0)) }.map_err(cuda_err)?;
            }
            let mut b = s.launch_builder(gpu.kernel("lora_expand_bgmv_bf16")?);
            b.arg(&*tmp).arg(y).arg(&self.pool).arg(&self.tables).arg(rows.row_adapter).arg(&module).arg(&mpa);
            b.arg(&self.ranks).arg(&self.scales).arg(&self.bt_offsets).arg(&out_i).arg(&mr).arg(&pe);
            b.arg(&mut sums.base_l1).arg(&mut sums.delta_l1);
            // SAFETY: the buffers passed were sized above for the rows and widths given.
            unsafe { b.launch(grid((rows.rows as u32, out_blocks), 256, 0)) }.map_err(cuda_err)?;
        } else {
            {
                let mut b = s.launch_builder(gpu.kernel("lora_shrink_sgmv_bf16")?);
                b.arg(x).arg(&mut *tmp).arg(&self.pool).arg(&self.tables).arg(rows.seg_start).arg(rows.seg_len);
                b.arg(rows.seg_adapter).arg(&module).arg(&mpa).arg(&self.ranks).arg(&self.a_offsets);
                b.arg(&in_i).arg(&mr).arg(&pe);
                // SAFETY: the buffers passed were sized above for the rows and widths given.
                unsafe { b.launch(grid((rows.seqs as u32, rows.max_rank as u32), 128, 0)) }.map_err(cuda_err)?;
            }
            let mut b = s.launch_builder(gpu.kernel("lora_expand_sgmv_bf16")?);
            b.arg(&*tmp).arg(y).arg(&self.pool).arg(&self.tables).arg(rows.seg_start).arg(rows.seg_len);
            b.arg(rows.seg_adapter).arg(&module).arg(&mpa).arg(&self.ranks).arg(&self.scales);
            b.arg(&self.bt_offsets).arg(&out_i).arg(&mr).arg(&pe).arg(&mut sums.base_l1).arg(&mut sums.delta_l1);
            // SAFETY: the buffers passed were sized above for the rows and widths given.
            unsafe { b.launch(grid((rows.seqs as u32, out_blocks), 256, 0)) }.map_err(cuda_err)?;
        }
        Ok(())
    }
}

/// Per sequence of a step: Σ|W·x| and Σ|Δy| over the rows and projections its adapter touches.
pub(crate) struct ShareSums {
    pub base_l1: CudaSlice<f32>,
    pub delta_l1: CudaSlice<f32>,
}

impl ShareSums {
    /// Zeroed sums for `seqs` sequences.
    pub fn new(gpu: &Gpu, seqs: usize) -> Result<Self> {
        Ok(ShareSums { base_l1: gpu.zeros(seqs)?, delta_l1: gpu.zeros(seqs)? })
    }

    /// The sums as the CPU backend reports them (waits for the compute stream).
    pub fn download(&self, gpu: &Gpu, seqs: usize) -> Result<Vec<AdapterShare>> {
        let (b, d) = (gpu.download(&self.base_l1)?, gpu.download(&self.delta_l1)?);
        Ok(b.iter().zip(&d).take(seqs).map(|(&b, &d)| AdapterShare { delta_l1: d as f64, base_l1: b as f64 }).collect())
    }
}

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
    /// An arena of `pages` pages of `page_elems` values with `slots` device slots.
    pub fn new(gpu: &Gpu, layers: usize, pages: usize, page_elems: usize, slots: usize) -> Result<Self> {
        let (alloc, host) = PageAllocator::new(pages, page_elems, 2);
        Ok(AdapterArena { alloc, host, device: GpuAdapters::new(gpu, layers, pages, page_elems, slots, pages)? })
    }

    /// Places `w` in free pages of the host arena (not yet on the device).
    pub fn place(&mut self, w: &LoraWeights) -> Result<ResidentAdapter> {
        self.alloc.place(&mut self.host, w).ok_or_else(|| {
            Error::Device(format!(
                "the adapter needs {} pages; {} are free",
                self.alloc.pages_needed(w),
                self.alloc.free_pages()
            ))
        })
    }

    /// Frees an adapter's pages in the host arena.
    pub fn release(&mut self, r: &ResidentAdapter) {
        self.alloc.release(r);
    }

    /// The device slot of `r`, uploading it if needed ([`GpuAdapters::slot_for`]).
    pub fn slot_for(&mut self, gpu: &Gpu, r: &ResidentAdapter, busy: &[u32]) -> Result<u32> {
        self.device.slot_for(gpu, r, &self.host, busy)
    }
}
