//! Adapters on the GPU: a bf16 mirror of the pager's active pool, page for page (S-LoRA's
//! unified paging: one pool of fixed-size pages shared by every rank), per-bank page tables
//! and module descriptors, uploads on the copy stream, and the batched LoRA op: shrink then
//! expand, segmented (SGMV) for prefill and gathered (BGMV) for decode, with every row's
//! adapter and rank in one launch.
//!
//! The pager decides which adapters are active and which pages they hold; a *bank* here binds
//! one such placement (by [`ResidentAdapter::id`]) to its page table and descriptors on the
//! device. A placement is uploaded when it is first bound; a new placement in reused pages is a
//! new id, so a stale device copy is never read.

use cudarc::driver::{CudaEvent, CudaSlice, CudaView, PushKernelArg};
use half::bf16;

use super::{Gpu, cuda_err, grid};
use crate::error::{Error, Result};
use crate::model::lora::AdapterShare;
use crate::pager::pool::{PoolData, ResidentAdapter, adapter_chunks};

/// Modules an adapter can have per layer (the seven projections).
const PROJS: usize = 7;

/// What a bank holds.
#[derive(Debug, Clone, Copy)]
struct Bound {
    placement: u64,
    max_rank: usize,
    last_used: u64,
}

/// Which placement each device bank holds, the least recently used going first: the
/// bookkeeping of [`GpuAdapters`], apart from device memory.
#[derive(Debug, Clone)]
struct BankTable {
    banks: Vec<Option<Bound>>,
    clock: u64,
}

impl BankTable {
    fn new(n: usize) -> Self {
        BankTable { banks: vec![None; n.max(1)], clock: 0 }
    }

    /// The widest rank in `bank` (0 if empty).
    fn rank(&self, bank: u32) -> usize {
        self.banks.get(bank as usize).copied().flatten().map_or(0, |b| b.max_rank)
    }

    /// `(bank, true)` if `placement` is bound (now the most recently used), else `(bank, false)`
    /// with the bank to bind it into: an empty one, or the least recently used not in `busy`.
    fn lookup(&mut self, placement: u64, busy: &[u32]) -> Result<(usize, bool)> {
        self.clock += 1;
        if let Some(s) = self.banks.iter().position(|b| b.is_some_and(|b| b.placement == placement)) {
            if let Some(b) = &mut self.banks[s] {
                b.last_used = self.clock;
            }
            return Ok((s, true));
        }
        let banks = &self.banks;
        (0..banks.len())
            .filter(|s| !busy.contains(&(*s as u32)))
            .min_by_key(|&s| banks[s].map_or(0, |b| b.last_used))
            .map(|s| (s, false))
            .ok_or_else(|| Error::device(format!("more adapters in one step than the {} GPU banks", banks.len())))
    }

    /// Records what `bank` holds (`None`: nothing, while it is being rewritten).
    fn set(&mut self, bank: usize, placement: Option<(u64, usize)>) {
        self.clock += 1;
        let clock = self.clock;
        self.banks[bank] = placement.map(|(placement, max_rank)| Bound { placement, max_rank, last_used: clock });
    }
}

/// A placement as the device needs it: its pages in bf16, in page-table order, and per module
/// (layer × 7 + projection) its rank (0: absent), scale, and where its `A` and `Bᵀ` rows start
/// in the device's page tables (`first` is the bank's first entry there).
struct Staged {
    pages: Vec<bf16>,
    ranks: Vec<i32>,
    scales: Vec<f32>,
    a_off: Vec<u32>,
    bt_off: Vec<u32>,
}

impl Staged {
    fn new(resident: &ResidentAdapter, host: &PoolData, modules_per_adapter: usize, first: usize) -> Result<Self> {
        let (mpa, pe) = (modules_per_adapter, host.page_elems());
        let mut st = Staged {
            pages: Vec::with_capacity(resident.pages().len() * pe),
            ranks: vec![0; mpa],
            scales: vec![0.0; mpa],
            a_off: vec![0; mpa],
            bt_off: vec![0; mpa],
        };
        match resident.source() {
            // The pool lives on the device: its pages come from the placement's own weights.
            Some(w) => {
                for chunk in adapter_chunks(w, pe) {
                    st.pages.extend(chunk.iter().map(|&v| bf16::from_f32(v)));
                    st.pages.resize(st.pages.len() + pe - chunk.len(), bf16::ZERO);
                }
            }
            None => {
                for &p in resident.pages() {
                    st.pages.extend(host.page(p).iter().map(|&v| bf16::from_f32(v)));
                }
            }
        }
        if st.pages.len() != resident.pages().len() * pe {
            return Err(Error::device("the adapter's pages do not match its placement"));
        }
        for m in resident.modules() {
            let id = m.layer * PROJS + m.proj;
            if id >= mpa {
                return Err(Error::device(format!("the adapter has a module in layer {} the model lacks", m.layer)));
            }
            st.ranks[id] = m.rank as i32;
            st.scales[id] = m.scale;
            st.a_off[id] = (first + m.a_first) as u32;
            st.bt_off[id] = (first + m.bt_first) as u32;
        }
        Ok(st)
    }
}

/// The step's row layout as the LoRA op needs it.
/// (The adapter parts are i32 on the device, passed as their u32 bits.)
pub(crate) struct LoraRows<'a> {
    pub decode: bool,
    /// The widest rank of the step's adapters (the shrink output's row width).
    pub max_rank: usize,
    pub rows: usize,
    pub seqs: usize,
    pub seg_start: CudaView<'a, u32>,
    pub seg_len: CudaView<'a, u32>,
    pub seg_adapter: CudaView<'a, u32>,
    pub row_adapter: CudaView<'a, u32>,
}

/// The device adapter pool.
pub struct GpuAdapters {
    pool: CudaSlice<bf16>,
    page_elems: usize,
    pages: usize,
    /// Page tables, `table_cap` entries per bank.
    tables: CudaSlice<u32>,
    table_cap: usize,
    /// Per module id (bank × layers × 7 + layer × 7 + projection): rank (0: absent), scale,
    /// and the offsets of its A and Bᵀ page tables in `tables`.
    ranks: CudaSlice<i32>,
    scales: CudaSlice<f32>,
    a_offsets: CudaSlice<u32>,
    bt_offsets: CudaSlice<u32>,
    modules_per_adapter: usize,
    banks: BankTable,
    /// Per bank: the copy stream's event after its last upload, which a step reading the bank
    /// waits for (and no other step does).
    ready: Vec<Option<CudaEvent>>,
    /// Placements uploaded so far (each adapter load from the host pool).
    pub uploads: u64,
}

impl GpuAdapters {
    /// A mirror of a host pool of `pages` pages of `page_elems` values, with `banks` adapter
    /// banks of up to `table_cap` pages each, for a model of `layers` layers.
    pub fn new(
        gpu: &Gpu,
        layers: usize,
        pages: usize,
        page_elems: usize,
        banks: usize,
        table_cap: usize,
    ) -> Result<Self> {
        let banks = banks.max(1);
        let modules = banks * layers * PROJS;
        // The mirror orders its uploads itself, one event per bank. cudarc's own tracking would
        // make every kernel that reads the pool wait for every upload into it, so it is off
        // while these buffers are made (they then carry no events of cudarc's).
        // SAFETY: only this mirror's buffers are made meanwhile, and every read of them is
        // ordered after their writes by `ready` (`wait_for_uploads`) or by the step boundary.
        unsafe { gpu.ctx.disable_event_tracking() };
        let made = (|| -> Result<_> {
            Ok((
                gpu.zeros::<bf16>(pages * page_elems)?,
                gpu.zeros::<u32>(banks * table_cap)?,
                gpu.zeros::<i32>(modules)?,
                gpu.zeros::<f32>(modules)?,
                gpu.zeros::<u32>(modules)?,
                gpu.zeros::<u32>(modules)?,
            ))
        })();
        // SAFETY: back to cudarc's default for every other buffer.
        unsafe { gpu.ctx.enable_event_tracking() };
        let (pool, tables, ranks, scales, a_offsets, bt_offsets) = made?;
        gpu.synchronize()?; // the zeroing is done before any upload on the copy stream
        Ok(GpuAdapters {
            pool,
            page_elems,
            pages,
            tables,
            table_cap,
            ranks,
            scales,
            a_offsets,
            bt_offsets,
            modules_per_adapter: layers * PROJS,
            banks: BankTable::new(banks),
            ready: (0..banks).map(|_| None).collect(),
            uploads: 0,
        })
    }

    /// Makes the compute stream wait for the uploads of `banks` (the step's adapters) and of
    /// nothing else: an upload for another bank goes on meanwhile.
    pub(crate) fn wait_for_uploads(&self, gpu: &Gpu, banks: impl Iterator<Item = u32>) -> Result<()> {
        for s in banks {
            if let Some(Some(ev)) = self.ready.get(s as usize) {
                gpu.stream.wait(ev).map_err(cuda_err)?;
            }
        }
        Ok(())
    }

    /// Bytes of device memory [`GpuAdapters::new`] takes with these arguments: the bf16 pages,
    /// the banks' page tables and the module descriptors.
    pub fn device_bytes(layers: usize, pages: usize, page_elems: usize, banks: usize, table_cap: usize) -> usize {
        pages * page_elems * 2 + banks.max(1) * (table_cap * 4 + layers * PROJS * 16)
    }

    /// The widest rank of the adapter in `bank` (0 if empty).
    pub fn bank_rank(&self, bank: u32) -> usize {
        self.banks.rank(bank)
    }

    /// The bank holding `resident`, binding (and uploading) it first if none does; the least
    /// recently used bank not named in `busy` (the step's other adapters) is reused. Callers
    /// bind between steps (each step ends by reading its logits back), so no kernel still
    /// reads a bank being rewritten.
    pub fn bank_for(&mut self, gpu: &Gpu, resident: &ResidentAdapter, host: &PoolData, busy: &[u32]) -> Result<u32> {
        let (bank, bound) = self.banks.lookup(resident.id(), busy)?;
        if !bound {
            self.bind(gpu, bank, resident, host)?;
        }
        Ok(bank as u32)
    }

    /// Uploads `resident`'s pages into the same pages of the device pool and points `bank` at
    /// them. The pages are converted to bf16 on the host, copied in one transfer on the copy
    /// stream and scattered there; the call returns at once, and the bank's event marks the end
    /// of its upload: a step reading the bank waits for it ([`GpuAdapters::wait_for_uploads`]).
    /// The copy stream frees the staging buffers after it has used them.
    pub fn bind(&mut self, gpu: &Gpu, bank: usize, resident: &ResidentAdapter, host: &PoolData) -> Result<()> {
        let table = resident.pages();
        if bank >= self.banks.banks.len() {
            return Err(Error::device(format!("adapter bank {bank} is out of range")));
        }
        if host.page_elems() != self.page_elems || table.iter().any(|&p| p as usize >= self.pages) {
            return Err(Error::device("the adapter's pages do not fit the device pool's geometry"));
        }
        if table.len() > self.table_cap {
            return Err(Error::device(format!(
                "the adapter holds {} pages; a GPU bank holds {}",
                table.len(),
                self.table_cap
            )));
        }
        self.banks.set(bank, None);
        let mpa = self.modules_per_adapter;
        let first = bank * self.table_cap;
        let st = Staged::new(resident, host, mpa, first)?;
        let cs = &gpu.copy_stream;
        let staged = cs.clone_htod(&st.pages).map_err(cuda_err)?;
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
        let mods = bank * mpa..(bank + 1) * mpa;
        cs.memcpy_htod(&st.ranks, &mut self.ranks.slice_mut(mods.clone())).map_err(cuda_err)?;
        cs.memcpy_htod(&st.scales, &mut self.scales.slice_mut(mods.clone())).map_err(cuda_err)?;
        cs.memcpy_htod(&st.a_off, &mut self.a_offsets.slice_mut(mods.clone())).map_err(cuda_err)?;
        cs.memcpy_htod(&st.bt_off, &mut self.bt_offsets.slice_mut(mods)).map_err(cuda_err)?;
        self.ready[bank] = Some(cs.record_event(None).map_err(cuda_err)?);
        self.uploads += 1;
        self.banks.set(bank, Some((resident.id(), resident.max_rank())));
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
        sums: &mut ShareSums<'_>,
        (out_dim, in_dim): (usize, usize),
    ) -> Result<()> {
        let s = &gpu.stream;
        let (module, mpa) = (module as i32, self.modules_per_adapter as i32);
        let (in_i, out_i, mr, pe) = (in_dim as i32, out_dim as i32, rows.max_rank as i32, self.page_elems as i32);
        let out_blocks = out_dim.div_ceil(256) as u32;
        // SAFETY (both launches): x is rows × in_dim, y rows × out_dim, tmp rows × max_rank;
        // the descriptors index only the bank tables and pages written by `place`.
        if rows.decode {
            {
                let mut b = s.launch_builder(gpu.kernel("lora_shrink_bgmv_bf16")?);
                b.arg(x).arg(&mut *tmp).arg(&self.pool).arg(&self.tables).arg(&rows.row_adapter).arg(&module).arg(&mpa);
                b.arg(&self.ranks).arg(&self.a_offsets).arg(&in_i).arg(&mr).arg(&pe);
                // SAFETY: the buffers passed were sized above for the rows and widths given.
                unsafe { b.launch(grid((rows.rows as u32, rows.max_rank as u32), 128, 0)) }.map_err(cuda_err)?;
            }
            let mut b = s.launch_builder(gpu.kernel("lora_expand_bgmv_bf16")?);
            b.arg(&*tmp).arg(y).arg(&self.pool).arg(&self.tables).arg(&rows.row_adapter).arg(&module).arg(&mpa);
            b.arg(&self.ranks).arg(&self.scales).arg(&self.bt_offsets).arg(&out_i).arg(&mr).arg(&pe);
            b.arg(&mut *sums.sums);
            // SAFETY: the buffers passed were sized above for the rows and widths given.
            unsafe { b.launch(grid((rows.rows as u32, out_blocks), 256, 0)) }.map_err(cuda_err)?;
        } else {
            {
                let mut b = s.launch_builder(gpu.kernel("lora_shrink_sgmv_bf16")?);
                b.arg(x).arg(&mut *tmp).arg(&self.pool).arg(&self.tables).arg(&rows.seg_start).arg(&rows.seg_len);
                b.arg(&rows.seg_adapter).arg(&module).arg(&mpa).arg(&self.ranks).arg(&self.a_offsets);
                b.arg(&in_i).arg(&mr).arg(&pe);
                // SAFETY: the buffers passed were sized above for the rows and widths given.
                unsafe { b.launch(grid((rows.seqs as u32, rows.max_rank as u32), 128, 0)) }.map_err(cuda_err)?;
            }
            let mut b = s.launch_builder(gpu.kernel("lora_expand_sgmv_bf16")?);
            b.arg(&*tmp).arg(y).arg(&self.pool).arg(&self.tables).arg(&rows.seg_start).arg(&rows.seg_len);
            b.arg(&rows.seg_adapter).arg(&module).arg(&mpa).arg(&self.ranks).arg(&self.scales);
            b.arg(&self.bt_offsets).arg(&out_i).arg(&mr).arg(&pe).arg(&mut *sums.sums);
            // SAFETY: the buffers passed were sized above for the rows and widths given.
            unsafe { b.launch(grid((rows.seqs as u32, out_blocks), 256, 0)) }.map_err(cuda_err)?;
        }
        Ok(())
    }
}

impl Drop for GpuAdapters {
    /// The copy stream may still be writing the buffers: wait for every upload before they go.
    fn drop(&mut self) {
        for ev in self.ready.iter().flatten() {
            // A failed upload has failed its step already (a device fault is reported there).
            let _ = ev.synchronize();
        }
    }
}

/// Per sequence of a step: Σ|W·x| and Σ|Δy| over the rows and projections its adapter touches,
/// side by side (`[seqs, 2]`), so one copy brings them back.
pub(crate) struct ShareSums<'a> {
    pub sums: &'a mut CudaSlice<f32>,
    seqs: usize,
}

impl<'a> ShareSums<'a> {
    /// The sums of `seqs` sequences in `buf` (at least `2 · seqs` long), zeroed.
    pub fn new(gpu: &Gpu, buf: &'a mut CudaSlice<f32>, seqs: usize) -> Result<Self> {
        gpu.stream.memset_zeros(&mut buf.slice_mut(0..2 * seqs)).map_err(cuda_err)?;
        Ok(ShareSums { sums: buf, seqs })
    }

    /// The sums as the CPU backend reports them (waits for the compute stream).
    pub fn download(&self, gpu: &Gpu) -> Result<Vec<AdapterShare>> {
        let v = gpu.stream.clone_dtoh(&self.sums.slice(0..2 * self.seqs)).map_err(cuda_err)?;
        Ok(v.chunks(2).map(|p| AdapterShare { base_l1: p[0] as f64, delta_l1: p[1] as f64 }).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::LoraModule;
    use crate::pager::pool::{PageAllocator, PoolPlace};

    #[test]
    fn banks_are_reused_least_recently_used_first_and_never_while_busy() {
        let mut t = BankTable::new(2);
        assert_eq!(t.lookup(10, &[]).expect("in the test"), (0, false));
        t.set(0, Some((10, 8)));
        assert_eq!(t.lookup(11, &[0]).expect("in the test"), (1, false));
        t.set(1, Some((11, 16)));
        assert_eq!((t.rank(0), t.rank(1), t.rank(7)), (8, 16, 0));
        assert_eq!(t.lookup(10, &[]).expect("in the test"), (0, true), "bound: found, and now the most recent");
        assert_eq!(t.lookup(12, &[]).expect("in the test"), (1, false), "11 is the least recently used");
        assert_eq!(t.lookup(12, &[1]).expect("in the test"), (0, false), "busy banks are never taken");
        assert!(t.lookup(12, &[0, 1]).is_err(), "more adapters than banks in one step");
    }

    /// The device reads element `k` of rank-row `r` of a module as the kernels' `paged()` does:
    /// page `tables[offset + r · ceil(width / page_elems) + k / page_elems]`, where the scatter
    /// put staged page `i` into pool page `table[i]`. Widths here are not multiples of the page.
    #[test]
    fn staged_pages_and_offsets_address_every_weight_as_the_kernels_read_them() {
        let (pe, layers, first) = (5, 2, 300);
        let module = |rank: usize, inp: usize, out: usize, seed: f32| LoraModule {
            rank,
            scale: 0.5 * seed,
            a: (0..rank * inp).map(|i| seed + i as f32 / 64.0).collect(),
            bt: (0..rank * out).map(|i| -seed - i as f32 / 32.0).collect(),
        };
        let mut l0: [Option<LoraModule>; 7] = Default::default();
        l0[0] = Some(module(2, 7, 6, 1.0));
        let mut l1: [Option<LoraModule>; 7] = Default::default();
        l1[6] = Some(module(3, 11, 7, 2.0));
        let w = crate::adapters::LoraWeights { layers: vec![l0, l1], bytes: 0 };
        let w = std::sync::Arc::new(w);
        // The same staging whether the pool's values are on the host or only in the placement.
        for place in [PoolPlace::Host, PoolPlace::Device] {
            let (mut alloc, mut host) = PageAllocator::new(200, pe, place);
            alloc.place(&mut host, &w).expect("in the test"); // a first copy, so the second's pages start mid-pool
            let resident = alloc.place(&mut host, &w).expect("in the test");
            assert_eq!(resident.source().is_some(), place == PoolPlace::Device);
            let st = Staged::new(&resident, &host, layers * PROJS, first).expect("in the test");
            let read = |off: u32, r: usize, k: usize, width: usize| {
                let i = off as usize - first + r * width.div_ceil(pe) + k / pe;
                st.pages[i * pe + k % pe].to_f32()
            };
            for (layer, l) in w.layers.iter().enumerate() {
                for (proj, m) in l.iter().enumerate() {
                    let id = layer * PROJS + proj;
                    let Some(m) = m else {
                        assert_eq!(st.ranks[id], 0);
                        continue;
                    };
                    assert_eq!((st.ranks[id] as usize, st.scales[id]), (m.rank, m.scale));
                    let (inp, out) = (m.a.len() / m.rank, m.bt.len() / m.rank);
                    for r in 0..m.rank {
                        for k in 0..inp {
                            assert_eq!(read(st.a_off[id], r, k, inp), bf16::from_f32(m.a[r * inp + k]).to_f32());
                        }
                        for o in 0..out {
                            assert_eq!(read(st.bt_off[id], r, o, out), bf16::from_f32(m.bt[r * out + o]).to_f32());
                        }
                    }
                }
            }
        }
    }
}
