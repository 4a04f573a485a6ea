//! Adapters on the GPU: one pool of fixed-size bf16 pages shared by every rank (S-LoRA's
//! unified paging, as the host pager's active tier), per-slot page tables and module
//! descriptors, uploads on the copy stream (overlapping compute), and the batched LoRA op:
//! shrink then expand, segmented (SGMV) for prefill and gathered (BGMV) for decode, with every
//! row's adapter and rank in one launch.

use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

use super::model::LoraRows;
use super::{Gpu, cuda_err, grid};
use crate::adapters::LoraWeights;
use crate::error::{Error, Result};

/// Modules an adapter can have per layer (the seven projections).
const PROJS: usize = 7;

/// The device adapter pool.
pub struct GpuAdapters {
    pool: CudaSlice<bf16>,
    page_elems: usize,
    free: Vec<u32>,
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
    slots: Vec<Option<Vec<u32>>>,
    /// The largest rank any slot may hold (the width of the shrink's output).
    pub max_rank: usize,
}

impl GpuAdapters {
    /// A pool of `pool_bytes` bytes of pages of `page_elems` bf16 values, with `slots` adapter
    /// slots of up to `table_cap` pages and rank `max_rank` each, for a model of `layers` layers.
    pub fn new(
        gpu: &Gpu,
        layers: usize,
        pool_bytes: usize,
        page_elems: usize,
        slots: usize,
        table_cap: usize,
        max_rank: usize,
    ) -> Result<Self> {
        let pages = pool_bytes / (page_elems * 2);
        let modules = slots * layers * PROJS;
        Ok(GpuAdapters {
            pool: gpu.zeros::<bf16>(pages * page_elems)?,
            page_elems,
            free: (0..pages as u32).rev().collect(),
            tables: gpu.zeros::<u32>(slots * table_cap)?,
            table_cap,
            ranks: gpu.zeros::<i32>(modules)?,
            scales: gpu.zeros::<f32>(modules)?,
            a_offsets: gpu.zeros::<u32>(modules)?,
            bt_offsets: gpu.zeros::<u32>(modules)?,
            modules_per_adapter: layers * PROJS,
            slots: vec![None; slots],
            max_rank,
        })
    }

    /// Pages free in the pool.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Copies an adapter into `slot` (replacing what was there): its rows are laid out page by
    /// page on the host in bf16, uploaded in one copy on the copy stream and scattered into free
    /// pages there; compute that uses the slot afterwards waits for the copy (cudarc orders the
    /// streams by the buffers' events).
    pub fn place(&mut self, gpu: &Gpu, slot: usize, w: &LoraWeights) -> Result<()> {
        if slot >= self.slots.len() {
            return Err(Error::Device(format!("adapter slot {slot} is out of range ({} slots)", self.slots.len())));
        }
        self.release(slot);
        let pe = self.page_elems;
        let mut staging: Vec<bf16> = Vec::new();
        let mut n_pages = 0usize;
        let base = slot * self.modules_per_adapter;
        let (mut ranks, mut scales, mut a_off, mut bt_off) = (
            vec![0i32; self.modules_per_adapter],
            vec![0f32; self.modules_per_adapter],
            vec![0u32; self.modules_per_adapter],
            vec![0u32; self.modules_per_adapter],
        );
        let stage_rows = |matrix: &[f32], rank: usize, staging: &mut Vec<bf16>, n_pages: &mut usize| -> u32 {
            let first = *n_pages;
            for row in matrix.chunks(matrix.len() / rank) {
                for chunk in row.chunks(pe) {
                    staging.extend(chunk.iter().map(|&v| bf16::from_f32(v)));
                    staging.resize((*n_pages + 1) * pe, bf16::ZERO);
                    *n_pages += 1;
                }
            }
            first as u32
        };
        for (l, layer) in w.layers.iter().enumerate() {
            for (p, m) in layer.iter().enumerate() {
                let Some(m) = m else { continue };
                if m.rank > self.max_rank {
                    return Err(Error::Device(format!(
                        "rank {} is above the pool's maximum {}",
                        m.rank, self.max_rank
                    )));
                }
                let id = l * PROJS + p;
                ranks[id] = m.rank as i32;
                scales[id] = m.scale;
                a_off[id] = (slot * self.table_cap) as u32 + stage_rows(&m.a, m.rank, &mut staging, &mut n_pages);
                bt_off[id] = (slot * self.table_cap) as u32 + stage_rows(&m.bt, m.rank, &mut staging, &mut n_pages);
            }
        }
        if n_pages > self.table_cap || n_pages > self.free.len() {
            return Err(Error::Device(format!(
                "the adapter needs {n_pages} pages; {} are free and a slot holds {}",
                self.free.len(),
                self.table_cap
            )));
        }
        let table: Vec<u32> = self.free.split_off(self.free.len() - n_pages);
        let cs = &gpu.copy_stream;
        let staged = cs.clone_htod(&staging).map_err(cuda_err)?;
        let dev_table = cs.clone_htod(&table).map_err(cuda_err)?;
        {
            let pe_i = pe as i32;
            let mut b = cs.launch_builder(gpu.kernel("scatter_pages_bf16")?);
            b.arg(&staged).arg(&mut self.pool).arg(&dev_table).arg(&pe_i);
            // SAFETY: reads n_pages staged pages and writes the pool pages the table names, all
            // below the pool's page count (they came from its free list).
            // SAFETY: the buffers passed were sized above for the rows and widths given.
            unsafe { b.launch(grid((n_pages as u32, 1), 256, 0)) }.map_err(cuda_err)?;
        }
        let range = |len: usize, at: usize| at..at + len;
        cs.memcpy_htod(&table, &mut self.tables.slice_mut(range(table.len(), slot * self.table_cap)))
            .map_err(cuda_err)?;
        let mods = range(self.modules_per_adapter, base);
        cs.memcpy_htod(&ranks, &mut self.ranks.slice_mut(mods.clone())).map_err(cuda_err)?;
        cs.memcpy_htod(&scales, &mut self.scales.slice_mut(mods.clone())).map_err(cuda_err)?;
        cs.memcpy_htod(&a_off, &mut self.a_offsets.slice_mut(mods.clone())).map_err(cuda_err)?;
        cs.memcpy_htod(&bt_off, &mut self.bt_offsets.slice_mut(mods)).map_err(cuda_err)?;
        // The staging buffers must outlive the copy: wait for the copy stream before they drop.
        cs.synchronize().map_err(cuda_err)?;
        self.slots[slot] = Some(table);
        Ok(())
    }

    /// Empties a slot, returning its pages (its rows' ranks stay until the slot is refilled;
    /// the caller stops naming the slot first).
    pub fn release(&mut self, slot: usize) {
        if let Some(Some(pages)) = self.slots.get_mut(slot).map(Option::take) {
            self.free.extend(pages);
        }
    }

    /// Adds every row's adapter delta for module `module` (layer × 7 + projection) to
    /// `y = x · Wᵀ`: shrink into `tmp` (f32, `[rows, max_rank]`), then expand into `y`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply(
        &self,
        gpu: &Gpu,
        rows: &LoraRows<'_>,
        module: usize,
        x: &CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
        tmp: &mut CudaSlice<f32>,
        (out_dim, in_dim): (usize, usize),
    ) -> Result<()> {
        let s = &gpu.stream;
        let (module, mpa) = (module as i32, self.modules_per_adapter as i32);
        let (in_i, out_i, mr, pe) = (in_dim as i32, out_dim as i32, self.max_rank as i32, self.page_elems as i32);
        let out_blocks = out_dim.div_ceil(256) as u32;
        // SAFETY (both launches): x is rows × in_dim, y rows × out_dim, tmp rows × max_rank;
        // the descriptors index only the slot tables and pages written by `place`.
        if rows.decode {
            {
                let mut b = s.launch_builder(gpu.kernel("lora_shrink_bgmv_bf16")?);
                b.arg(x).arg(&mut *tmp).arg(&self.pool).arg(&self.tables).arg(rows.row_adapter).arg(&module).arg(&mpa);
                b.arg(&self.ranks).arg(&self.a_offsets).arg(&in_i).arg(&mr).arg(&pe);
                // SAFETY: the buffers passed were sized above for the rows and widths given.
                unsafe { b.launch(grid((rows.rows as u32, self.max_rank as u32), 128, 0)) }.map_err(cuda_err)?;
            }
            let mut b = s.launch_builder(gpu.kernel("lora_expand_bgmv_bf16")?);
            b.arg(&*tmp).arg(y).arg(&self.pool).arg(&self.tables).arg(rows.row_adapter).arg(&module).arg(&mpa);
            b.arg(&self.ranks).arg(&self.scales).arg(&self.bt_offsets).arg(&out_i).arg(&mr).arg(&pe);
            // SAFETY: the buffers passed were sized above for the rows and widths given.
            unsafe { b.launch(grid((rows.rows as u32, out_blocks), 256, 0)) }.map_err(cuda_err)?;
        } else {
            {
                let mut b = s.launch_builder(gpu.kernel("lora_shrink_sgmv_bf16")?);
                b.arg(x).arg(&mut *tmp).arg(&self.pool).arg(&self.tables).arg(rows.seg_start).arg(rows.seg_len);
                b.arg(rows.seg_adapter).arg(&module).arg(&mpa).arg(&self.ranks).arg(&self.a_offsets);
                b.arg(&in_i).arg(&mr).arg(&pe);
                // SAFETY: the buffers passed were sized above for the rows and widths given.
                unsafe { b.launch(grid((rows.seqs as u32, self.max_rank as u32), 128, 0)) }.map_err(cuda_err)?;
            }
            let mut b = s.launch_builder(gpu.kernel("lora_expand_sgmv_bf16")?);
            b.arg(&*tmp).arg(y).arg(&self.pool).arg(&self.tables).arg(rows.seg_start).arg(rows.seg_len);
            b.arg(rows.seg_adapter).arg(&module).arg(&mpa).arg(&self.ranks).arg(&self.scales);
            b.arg(&self.bt_offsets).arg(&out_i).arg(&mr).arg(&pe);
            // SAFETY: the buffers passed were sized above for the rows and widths given.
            unsafe { b.launch(grid((rows.seqs as u32, out_blocks), 256, 0)) }.map_err(cuda_err)?;
        }
        Ok(())
    }
}
