//! The active tier: one arena of fixed-size pages shared by adapters of every rank.

use std::ops::Range;
use std::sync::Arc;

use openlora_kernels::floats::{bf16_to_f32, f32_to_bf16};
use openlora_kernels::lora::{LoraModuleView, PagePool, PageValues};

use crate::adapters::LoraWeights;
use crate::shape::Proj;

/// Where one projection's `A` and `Bᵀ` rows sit in the page table of its adapter.
#[derive(Debug, Clone)]
struct ModuleRange {
    rank: usize,
    scale: f32,
    a: Range<usize>,
    bt: Range<usize>,
}

/// Where the active pool's values live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolPlace {
    /// In host memory as f32: the CPU backend's LoRA op reads them there.
    Host,
    /// In host memory as bf16, for a CPU backend serving in bf16: the LoRA op reads half the
    /// bytes (and rounds the adapter as transformers + PEFT run in bf16 do).
    HostBf16,
    /// On a GPU as bf16: the device mirror stages each placement from its source weights (held
    /// once, shared with the host cache), and the host keeps no copy of the pool.
    Device,
}

impl PoolPlace {
    /// Bytes one pooled value costs where the pool lives.
    pub fn value_bytes(self) -> usize {
        match self {
            PoolPlace::Host => 4,
            PoolPlace::HostBf16 | PoolPlace::Device => 2,
        }
    }

    /// Whether the values live in host memory (where the CPU backend reads them).
    pub fn on_host(self) -> bool {
        self != PoolPlace::Device
    }

    /// Where a backend's pool lives: on the device for a GPU; on the host for the CPU, in bf16
    /// when the model is served in bf16 (`dtype = "bf16"`; as stored, adapters stay f32).
    pub fn for_backend(gpu: bool, serves_bf16: bool) -> Self {
        match (gpu, serves_bf16) {
            (true, _) => PoolPlace::Device,
            (false, true) => PoolPlace::HostBf16,
            (false, false) => PoolPlace::Host,
        }
    }
}

/// The host copy of a pool's values.
enum HostValues {
    /// f32 values ([`PoolPlace::Host`]).
    F32(Vec<f32>),
    /// bf16 bits ([`PoolPlace::HostBf16`]).
    Bf16(Vec<u16>),
}

/// The page-sized pieces of a `rank`-row matrix in the order its pages are laid out: row by
/// row, each row cut every `page_elems` values (the last piece of a row may be shorter).
fn matrix_chunks(matrix: &[f32], rank: usize, page_elems: usize) -> impl Iterator<Item = &[f32]> {
    let width = (matrix.len() / rank.max(1)).max(1);
    matrix.chunks(width).flat_map(move |row| row.chunks(page_elems))
}

/// Every page-sized piece of an adapter, in the order [`PageAllocator::place`] gives them pages.
pub fn adapter_chunks(w: &LoraWeights, page_elems: usize) -> impl Iterator<Item = &[f32]> {
    w.layers
        .iter()
        .flat_map(|l| l.iter().flatten())
        .flat_map(move |m| matrix_chunks(&m.a, m.rank, page_elems).chain(matrix_chunks(&m.bt, m.rank, page_elems)))
}

/// An adapter copied into the page arena: its page table and where each module's rows are.
#[derive(Debug)]
pub struct ResidentAdapter {
    id: u64,
    table: Vec<u32>,
    modules: Vec<[Option<ModuleRange>; 7]>,
    /// The weights its pages hold, when the pool's values live on a device (not on the host).
    source: Option<Arc<LoraWeights>>,
}

/// One module of a resident adapter as a device mirror needs it: where its rows start in the
/// adapter's page table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModulePlace {
    /// Decoder layer.
    pub layer: usize,
    /// Projection ([`Proj`] as an index).
    pub proj: usize,
    /// Its rank.
    pub rank: usize,
    /// `alpha / rank`.
    pub scale: f32,
    /// Index in the page table of `A`'s first page.
    pub a_first: usize,
    /// Index in the page table of `Bᵀ`'s first page.
    pub bt_first: usize,
}

impl crate::model::lora::PlacedAdapter for ResidentAdapter {
    fn view(&self, layer: usize, proj: Proj) -> Option<LoraModuleView<'_>> {
        ResidentAdapter::view(self, layer, proj)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Identities of placements: a new one for every adapter copied into the arena, never reused.
static NEXT_PLACEMENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl ResidentAdapter {
    /// The kernel's view of one projection's weights, if this adapter has it.
    pub fn view(&self, layer: usize, proj: Proj) -> Option<LoraModuleView<'_>> {
        let range = self.modules.get(layer)?[proj as usize].as_ref()?;
        Some(LoraModuleView {
            rank: range.rank,
            scale: range.scale,
            a_pages: &self.table[range.a.clone()],
            bt_pages: &self.table[range.bt.clone()],
        })
    }

    /// Pages this adapter occupies.
    pub fn pages(&self) -> &[u32] {
        &self.table
    }

    /// This placement's identity: a device copy made from it stays valid while it is the same.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Every module it has, with where its rows start in [`ResidentAdapter::pages`].
    pub fn modules(&self) -> impl Iterator<Item = ModulePlace> + '_ {
        self.modules.iter().enumerate().flat_map(|(layer, ranges)| {
            ranges.iter().enumerate().filter_map(move |(proj, m)| {
                m.as_ref().map(|m| ModulePlace {
                    layer,
                    proj,
                    rank: m.rank,
                    scale: m.scale,
                    a_first: m.a.start,
                    bt_first: m.bt.start,
                })
            })
        })
    }

    /// Its largest rank.
    pub fn max_rank(&self) -> usize {
        self.modules().map(|m| m.rank).max().unwrap_or(0)
    }

    /// The weights its pages hold, when the pool lives on a device (a device mirror stages its
    /// pages from them: [`adapter_chunks`]).
    pub fn source(&self) -> Option<&LoraWeights> {
        self.source.as_deref()
    }
}

/// The arena's data, read by the LoRA op while a batch runs.
pub struct PoolData {
    data: HostValues,
    page_elems: usize,
    place: PoolPlace,
}

impl PoolData {
    /// Where the values live (on the device: `data` is empty, each placement keeps its source).
    pub fn place(&self) -> PoolPlace {
        self.place
    }

    /// Host memory the pool's values take (none when the pool lives on a device).
    pub fn host_bytes(&self) -> usize {
        match &self.data {
            HostValues::F32(v) => v.len() * 4,
            HostValues::Bf16(v) => v.len() * 2,
        }
    }

    /// The kernel's view of the arena.
    pub fn view(&self) -> PagePool<'_> {
        let pages = match &self.data {
            HostValues::F32(v) => PageValues::F32(v),
            HostValues::Bf16(v) => PageValues::Bf16(v),
        };
        PagePool { pages, page_elems: self.page_elems }
    }

    /// The values of page `page`, as f32.
    pub fn page(&self, page: u32) -> Vec<f32> {
        let s = page as usize * self.page_elems;
        match &self.data {
            HostValues::F32(v) => v[s..s + self.page_elems].to_vec(),
            HostValues::Bf16(v) => v[s..s + self.page_elems].iter().map(|&b| bf16_to_f32(b)).collect(),
        }
    }

    /// Writes `values` at the start of page `page` (bf16 pools round them to nearest even).
    fn write(&mut self, page: u32, values: &[f32]) {
        let s = page as usize * self.page_elems;
        match &mut self.data {
            HostValues::F32(v) => v[s..s + values.len()].copy_from_slice(values),
            HostValues::Bf16(v) => {
                v[s..s + values.len()].iter_mut().zip(values).for_each(|(d, &x)| *d = f32_to_bf16(x))
            }
        }
    }

    /// Values per page.
    pub fn page_elems(&self) -> usize {
        self.page_elems
    }
}

/// Free-page bookkeeping of the arena.
pub struct PageAllocator {
    free: Vec<u32>,
    total: usize,
    page_elems: usize,
    value_bytes: usize,
}

impl PageAllocator {
    /// An arena of `pages` pages of `page_elems` values each living at `place`, and its data:
    /// zeroed pages on the host, none for a device (each placement keeps its source).
    pub fn new(pages: usize, page_elems: usize, place: PoolPlace) -> (Self, PoolData) {
        let free = (0..pages as u32).rev().collect();
        let data = match place {
            PoolPlace::Host => HostValues::F32(vec![0.0; pages * page_elems]),
            PoolPlace::HostBf16 => HostValues::Bf16(vec![0; pages * page_elems]),
            PoolPlace::Device => HostValues::F32(Vec::new()),
        };
        (
            PageAllocator { free, total: pages, page_elems, value_bytes: place.value_bytes() },
            PoolData { data, page_elems, place },
        )
    }

    /// Pages free now.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Pages in the arena.
    pub fn total_pages(&self) -> usize {
        self.total
    }

    /// Bytes of one page.
    pub fn page_bytes(&self) -> usize {
        self.page_elems * self.value_bytes
    }

    /// Pages an adapter needs: one run of pages per rank-row of each `A` and `Bᵀ`.
    pub fn pages_needed(&self, w: &LoraWeights) -> usize {
        w.layers
            .iter()
            .flat_map(|l| l.iter().flatten())
            .map(|m| self.module_pages(m.rank, m.a.len() / m.rank, m.bt.len() / m.rank))
            .sum()
    }

    /// Pages one module of rank `rank` needs, its `A` rows `in_dim` wide and `Bᵀ` rows `out_dim`.
    pub fn module_pages(&self, rank: usize, in_dim: usize, out_dim: usize) -> usize {
        rank * (in_dim.div_ceil(self.page_elems) + out_dim.div_ceil(self.page_elems))
    }

    /// Gives an adapter free pages and copies it there (on the host), or returns `None` if too
    /// few are free. A device pool keeps `w` itself instead of a copy.
    pub fn place(&mut self, data: &mut PoolData, w: &Arc<LoraWeights>) -> Option<ResidentAdapter> {
        let need = self.pages_needed(w);
        if need > self.free.len() {
            return None;
        }
        let pe = self.page_elems;
        let on_host = data.place.on_host();
        let mut table = Vec::with_capacity(need);
        let mut write_rows = |matrix: &[f32], rank: usize, table: &mut Vec<u32>| -> Range<usize> {
            let start = table.len();
            for chunk in matrix_chunks(matrix, rank, pe) {
                // `need` pages were checked free above, so pop cannot fail.
                let Some(page) = self.free.pop() else { unreachable!("free pages were counted") };
                if on_host {
                    data.write(page, chunk);
                }
                table.push(page);
            }
            start..table.len()
        };
        let mut modules = Vec::with_capacity(w.layers.len());
        for layer in &w.layers {
            let mut ranges: [Option<ModuleRange>; 7] = Default::default();
            for (i, m) in layer.iter().enumerate() {
                if let Some(m) = m {
                    let a = write_rows(&m.a, m.rank, &mut table);
                    let bt = write_rows(&m.bt, m.rank, &mut table);
                    ranges[i] = Some(ModuleRange { rank: m.rank, scale: m.scale, a, bt });
                }
            }
            modules.push(ranges);
        }
        let id = NEXT_PLACEMENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(ResidentAdapter { id, table, modules, source: (!on_host).then(|| w.clone()) })
    }

    /// Returns an evicted adapter's pages to the free list.
    pub fn release(&mut self, adapter: &ResidentAdapter) {
        self.free.extend_from_slice(&adapter.table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::LoraModule;

    fn adapter() -> Arc<LoraWeights> {
        let module =
            LoraModule { rank: 2, scale: 1.0, a: (0..2 * 10).map(|i| i as f32).collect(), bt: vec![0.5; 2 * 7] };
        let mut layer: [Option<LoraModule>; 7] = Default::default();
        layer[1] = Some(module);
        Arc::new(LoraWeights { layers: vec![layer], bytes: 0 })
    }

    #[test]
    fn a_device_pool_keeps_no_host_copy_of_its_values() {
        let (mut host_alloc, mut host) = PageAllocator::new(64, 4, PoolPlace::Host);
        let (mut dev_alloc, mut dev) = PageAllocator::new(64, 4, PoolPlace::Device);
        assert_eq!(host.host_bytes(), 64 * 4 * 4);
        assert_eq!(dev.host_bytes(), 0, "no f32 copy of a device pool on the host");
        assert_eq!((host_alloc.page_bytes(), dev_alloc.page_bytes()), (16, 8));
        let w = adapter();
        let on_host = host_alloc.place(&mut host, &w).expect("room");
        let on_device = dev_alloc.place(&mut dev, &w).expect("room");
        assert!(on_host.source().is_none());
        assert!(on_device.source().is_some_and(|s| std::ptr::eq(s, &*w)), "the placement shares the weights");
        // The same pages, and the device placement's chunks are the values the host copied.
        assert_eq!(on_host.pages(), on_device.pages());
        for (&page, chunk) in on_host.pages().iter().zip(adapter_chunks(&w, 4)) {
            assert_eq!(&host.page(page)[..chunk.len()], chunk);
        }
        assert_eq!(adapter_chunks(&w, 4).count(), on_device.pages().len());
    }

    #[test]
    fn a_bf16_host_pool_holds_the_values_rounded_in_half_the_bytes() {
        use openlora_kernels::floats::{bf16_to_f32, f32_to_bf16};
        let (mut alloc, mut pool) = PageAllocator::new(64, 4, PoolPlace::HostBf16);
        assert_eq!((pool.host_bytes(), alloc.page_bytes()), (64 * 4 * 2, 8));
        // Values that bf16 cannot hold exactly, so the rounding shows.
        let mut w = (*adapter()).clone();
        let m = w.layers[0][1].as_mut().expect("module");
        m.a.iter_mut().for_each(|v| *v = *v / 3.0 + 0.001);
        let w = Arc::new(w);
        let placed = alloc.place(&mut pool, &w).expect("room");
        assert!(placed.source().is_none(), "a host pool keeps its own copy");
        for (&page, chunk) in placed.pages().iter().zip(adapter_chunks(&w, 4)) {
            let want: Vec<f32> = chunk.iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect();
            assert_eq!(&pool.page(page)[..chunk.len()], &want[..]);
        }
        assert!(matches!(pool.view().pages, PageValues::Bf16(_)));
    }
}
