//! The active tier: one arena of fixed-size pages shared by adapters of every rank.

use std::ops::Range;

use openlora_kernels::lora::{LoraModuleView, PagePool};

use crate::adapters::LoraWeights;
use crate::model::Proj;

/// Where one projection's `A` and `Bᵀ` rows sit in the page table of its adapter.
#[derive(Debug, Clone)]
struct ModuleSlot {
    rank: usize,
    scale: f32,
    a: Range<usize>,
    bt: Range<usize>,
}

/// An adapter copied into the page arena: its page table and where each module's rows are.
#[derive(Debug)]
pub struct ResidentAdapter {
    id: u64,
    table: Vec<u32>,
    modules: Vec<[Option<ModuleSlot>; 7]>,
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

/// Identities of placements: a new one for every adapter copied into the arena, never reused.
static NEXT_PLACEMENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl ResidentAdapter {
    /// The kernel's view of one projection's weights, if this adapter has it.
    pub fn view(&self, layer: usize, proj: Proj) -> Option<LoraModuleView<'_>> {
        let slot = self.modules.get(layer)?[proj as usize].as_ref()?;
        Some(LoraModuleView {
            rank: slot.rank,
            scale: slot.scale,
            a_pages: &self.table[slot.a.clone()],
            bt_pages: &self.table[slot.bt.clone()],
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
        self.modules.iter().enumerate().flat_map(|(layer, slots)| {
            slots.iter().enumerate().filter_map(move |(proj, m)| {
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
}

/// The arena's data, read by the LoRA op while a batch runs.
pub struct PoolData {
    data: Vec<f32>,
    page_elems: usize,
}

impl PoolData {
    /// The kernel's view of the arena.
    pub fn view(&self) -> PagePool<'_> {
        PagePool { pages: &self.data, page_elems: self.page_elems }
    }

    /// The values of page `page`.
    pub fn page(&self, page: u32) -> &[f32] {
        let s = page as usize * self.page_elems;
        &self.data[s..s + self.page_elems]
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
    /// An arena of `pages` pages of `page_elems` values each, and its (zeroed) f32 data;
    /// `value_bytes` is what one value costs where the pool lives (4 on the host, 2 in bf16).
    pub fn new(pages: usize, page_elems: usize, value_bytes: usize) -> (Self, PoolData) {
        let free = (0..pages as u32).rev().collect();
        (
            PageAllocator { free, total: pages, page_elems, value_bytes },
            PoolData { data: vec![0.0; pages * page_elems], page_elems },
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
        let per_row = |width: usize| width.div_ceil(self.page_elems);
        w.layers
            .iter()
            .flat_map(|l| l.iter().flatten())
            .map(|m| m.rank * (per_row(m.a.len() / m.rank) + per_row(m.bt.len() / m.rank)))
            .sum()
    }

    /// Copies an adapter into free pages, or returns `None` if too few are free.
    pub fn place(&mut self, data: &mut PoolData, w: &LoraWeights) -> Option<ResidentAdapter> {
        let need = self.pages_needed(w);
        if need > self.free.len() {
            return None;
        }
        let pe = self.page_elems;
        let mut table = Vec::with_capacity(need);
        let mut write_rows = |matrix: &[f32], rank: usize, table: &mut Vec<u32>| -> Range<usize> {
            let start = table.len();
            let width = matrix.len() / rank;
            for row in matrix.chunks(width) {
                for chunk in row.chunks(pe) {
                    // `need` pages were checked free above, so pop cannot fail.
                    let Some(page) = self.free.pop() else { unreachable!("free pages were counted") };
                    let s = page as usize * pe;
                    data.data[s..s + chunk.len()].copy_from_slice(chunk);
                    table.push(page);
                }
            }
            start..table.len()
        };
        let mut modules = Vec::with_capacity(w.layers.len());
        for layer in &w.layers {
            let mut slots: [Option<ModuleSlot>; 7] = Default::default();
            for (i, m) in layer.iter().enumerate() {
                if let Some(m) = m {
                    let a = write_rows(&m.a, m.rank, &mut table);
                    let bt = write_rows(&m.bt, m.rank, &mut table);
                    slots[i] = Some(ModuleSlot { rank: m.rank, scale: m.scale, a, bt });
                }
            }
            modules.push(slots);
        }
        let id = NEXT_PLACEMENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(ResidentAdapter { id, table, modules })
    }

    /// Returns an evicted adapter's pages to the free list.
    pub fn release(&mut self, adapter: &ResidentAdapter) {
        self.free.extend_from_slice(&adapter.table);
    }
}
