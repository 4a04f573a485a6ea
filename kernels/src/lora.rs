//! Batched heterogeneous LoRA, CPU reference: `y[i] += scale · (x[i] · Aᵀ) · Bᵀ` for a batch
//! whose rows carry different adapters of different ranks (or none), in one call.
//!
//! Adapter weights live in a pool of fixed-size pages shared by every rank (S-LoRA's unified
//! paging): each rank-row of `A` (`in_dim` wide) and of `Bᵀ` (`out_dim` wide) occupies
//! `ceil(width / page_elems)` pages, found through the module's page table, so a rank-8 and a
//! rank-64 adapter sit side by side without padding to a maximum rank.
//!
//! Two schedules, as in Punica / S-LoRA: [`sgmv`] for prefill, where consecutive rows of one
//! sequence share an adapter and each weight row is read once per block of tokens; [`bgmv`] for
//! decode, where every row gathers its own adapter's weights. Both *shrink* (`x · Aᵀ`, rank
//! wide) then *expand* (`· Bᵀ`), and parallelise over rows with rayon.

use rayon::prelude::*;

use crate::vec::{axpy, axpy_bf16, dot, dot_bf16};

/// The values of a page pool, back to back: page `p` is `[p * page_elems .. (p + 1) * page_elems]`.
#[derive(Clone, Copy)]
pub enum PageValues<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bfloat16 values as bits (the top half of an f32): half the bytes to read, each widened
    /// exactly to f32 as it is multiplied.
    Bf16(&'a [u16]),
}

/// The page pool adapter weights are read from.
#[derive(Clone, Copy)]
pub struct PagePool<'a> {
    /// Every page's values.
    pub pages: PageValues<'a>,
    /// Elements per page.
    pub page_elems: usize,
}

impl PagePool<'_> {
    /// Pages one row of `width` elements occupies.
    pub fn pages_per_row(&self, width: usize) -> usize {
        width.div_ceil(self.page_elems)
    }
}

/// A value type a pool can hold: how f32 activations meet a run of its values.
trait PoolValue: Copy + Sync {
    /// `Σ x[i] · w[i]`.
    fn dot(x: &[f32], w: &[Self]) -> f32;
    /// `y[i] += alpha · w[i]`.
    fn axpy(y: &mut [f32], alpha: f32, w: &[Self]);
}

impl PoolValue for f32 {
    fn dot(x: &[f32], w: &[f32]) -> f32 {
        dot(x, w)
    }
    fn axpy(y: &mut [f32], alpha: f32, w: &[f32]) {
        axpy(y, alpha, w)
    }
}

/// bf16 bits (the only 16-bit values a [`PageValues`] holds).
impl PoolValue for u16 {
    fn dot(x: &[f32], w: &[u16]) -> f32 {
        dot_bf16(x, w)
    }
    fn axpy(y: &mut [f32], alpha: f32, w: &[u16]) {
        axpy_bf16(y, alpha, w)
    }
}

/// A pool's pages of one value type.
#[derive(Clone, Copy)]
struct Typed<'a, T> {
    pages: &'a [T],
    page_elems: usize,
}

impl<'a, T: PoolValue> Typed<'a, T> {
    /// Calls `f(offset, chunk)` for each page-sized chunk of row `row` of a module matrix whose
    /// rows are `width` wide and whose page table is `table`.
    #[inline]
    fn for_row_chunks(&self, table: &[u32], row: usize, width: usize, mut f: impl FnMut(usize, &'a [T])) {
        let ppr = width.div_ceil(self.page_elems);
        for (j, &page) in table[row * ppr..(row + 1) * ppr].iter().enumerate() {
            let off = j * self.page_elems;
            let len = self.page_elems.min(width - off);
            let start = page as usize * self.page_elems;
            f(off, &self.pages[start..start + len]);
        }
    }
}

/// One adapter's weights for one projection, located in a [`PagePool`].
#[derive(Clone, Copy, Debug)]
pub struct LoraModuleView<'a> {
    /// Rank `r`.
    pub rank: usize,
    /// Multiplier (`alpha / r`, or `alpha / sqrt(r)` for rsLoRA).
    pub scale: f32,
    /// Page table of `A` (`rank` rows of `in_dim`).
    pub a_pages: &'a [u32],
    /// Page table of `Bᵀ` (`rank` rows of `out_dim`).
    pub bt_pages: &'a [u32],
}

/// A run of consecutive rows that share one adapter (or none).
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    /// First row.
    pub start: usize,
    /// Number of rows.
    pub len: usize,
    /// The adapter module for these rows; `None` leaves them untouched.
    pub module: Option<LoraModuleView<'a>>,
}

/// Shapes of one call: `x: [rows, in_dim]`, `y: [rows, out_dim]`, row-major.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    /// Width of `x`.
    pub in_dim: usize,
    /// Width of `y`.
    pub out_dim: usize,
}

fn check(pool: &PagePool<'_>, x: &[f32], y: &[f32], d: Dims, m: &LoraModuleView<'_>) {
    assert_eq!(x.len() / d.in_dim, y.len() / d.out_dim, "x and y row counts differ");
    assert_eq!(m.a_pages.len(), m.rank * pool.pages_per_row(d.in_dim), "A page table size");
    assert_eq!(m.bt_pages.len(), m.rank * pool.pages_per_row(d.out_dim), "Bᵀ page table size");
}

/// Rows per block in [`sgmv`]: each weight row is read once per block of this many tokens.
const SGMV_BLOCK: usize = 8;

/// Segmented LoRA for prefill: rows `seg.start .. seg.start + seg.len` all use `seg.module`.
pub fn sgmv(pool: PagePool<'_>, x: &[f32], y: &mut [f32], d: Dims, segments: &[Segment<'_>]) {
    let pe = pool.page_elems;
    match pool.pages {
        PageValues::F32(pages) => sgmv_on(Typed { pages, page_elems: pe }, pool, x, y, d, segments),
        PageValues::Bf16(pages) => sgmv_on(Typed { pages, page_elems: pe }, pool, x, y, d, segments),
    }
}

/// [`sgmv`] over a pool of `T` values.
fn sgmv_on<T: PoolValue>(
    pages: Typed<'_, T>,
    pool: PagePool<'_>,
    x: &[f32],
    y: &mut [f32],
    d: Dims,
    segments: &[Segment<'_>],
) {
    for seg in segments {
        assert!((seg.start + seg.len) * d.out_dim <= y.len(), "segment past the last row");
        if let Some(m) = &seg.module {
            check(&pool, x, y, d, m);
        }
    }
    // Cut segments into blocks of rows, each block owning a disjoint slice of y.
    let mut blocks: Vec<(usize, &mut [f32], LoraModuleView<'_>)> = Vec::new();
    let mut rest: &mut [f32] = y;
    let mut consumed = 0;
    let mut segs: Vec<&Segment<'_>> = segments.iter().collect();
    segs.sort_by_key(|s| s.start);
    for seg in segs {
        let Some(m) = seg.module else { continue };
        assert!(seg.start >= consumed, "segments overlap");
        let skip = (seg.start - consumed) * d.out_dim;
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
        let (mut mine, tail) = tail.split_at_mut(seg.len * d.out_dim);
        rest = tail;
        consumed = seg.start + seg.len;
        let mut row = seg.start;
        while !mine.is_empty() {
            let n = SGMV_BLOCK.min(mine.len() / d.out_dim);
            let (block, after) = std::mem::take(&mut mine).split_at_mut(n * d.out_dim);
            blocks.push((row, block, m));
            mine = after;
            row += n;
        }
    }
    blocks.into_par_iter().for_each(|(row0, yb, m)| {
        let n = yb.len() / d.out_dim;
        let xb = &x[row0 * d.in_dim..(row0 + n) * d.in_dim];
        // Shrink: v[t][k] = x_t · A_k, reading each A row once for the block.
        // On the stack for ranks up to 64; a larger rank's block takes a heap buffer.
        let mut stack = [0f32; SGMV_BLOCK * 64];
        let mut heap;
        let v: &mut [f32] = if n * m.rank <= stack.len() {
            &mut stack[..n * m.rank]
        } else {
            heap = vec![0f32; n * m.rank];
            &mut heap
        };
        for k in 0..m.rank {
            pages.for_row_chunks(m.a_pages, k, d.in_dim, |off, chunk| {
                for t in 0..n {
                    let xt = &xb[t * d.in_dim + off..t * d.in_dim + off + chunk.len()];
                    v[t * m.rank + k] += T::dot(xt, chunk);
                }
            });
        }
        // Expand: y_t += scale · Σ_k v[t][k] · Bᵀ_k, reading each Bᵀ row once for the block.
        for k in 0..m.rank {
            pages.for_row_chunks(m.bt_pages, k, d.out_dim, |off, chunk| {
                for t in 0..n {
                    let yt = &mut yb[t * d.out_dim + off..t * d.out_dim + off + chunk.len()];
                    T::axpy(yt, m.scale * v[t * m.rank + k], chunk);
                }
            });
        }
    });
}

/// Gathered LoRA for decode: row `i` uses `rows[i]` (one token per sequence).
pub fn bgmv(pool: PagePool<'_>, x: &[f32], y: &mut [f32], d: Dims, rows: &[Option<LoraModuleView<'_>>]) {
    let pe = pool.page_elems;
    match pool.pages {
        PageValues::F32(pages) => bgmv_on(Typed { pages, page_elems: pe }, pool, x, y, d, rows),
        PageValues::Bf16(pages) => bgmv_on(Typed { pages, page_elems: pe }, pool, x, y, d, rows),
    }
}

/// [`bgmv`] over a pool of `T` values.
fn bgmv_on<T: PoolValue>(
    pages: Typed<'_, T>,
    pool: PagePool<'_>,
    x: &[f32],
    y: &mut [f32],
    d: Dims,
    rows: &[Option<LoraModuleView<'_>>],
) {
    assert_eq!(rows.len() * d.out_dim, y.len(), "one module entry per row");
    for m in rows.iter().flatten() {
        check(&pool, x, y, d, m);
    }
    y.par_chunks_mut(d.out_dim).zip(rows.par_iter()).enumerate().for_each(|(i, (yi, m))| {
        let Some(m) = m else { return };
        let xi = &x[i * d.in_dim..(i + 1) * d.in_dim];
        let mut v = [0f32; 64];
        let mut heap;
        let v: &mut [f32] = if m.rank <= v.len() {
            &mut v[..m.rank]
        } else {
            heap = vec![0f32; m.rank];
            &mut heap
        };
        for (k, vk) in v.iter_mut().enumerate() {
            pages
                .for_row_chunks(m.a_pages, k, d.in_dim, |off, chunk| *vk += T::dot(&xi[off..off + chunk.len()], chunk));
        }
        for (k, vk) in v.iter().enumerate() {
            pages.for_row_chunks(m.bt_pages, k, d.out_dim, |off, chunk| {
                T::axpy(&mut yi[off..off + chunk.len()], m.scale * vk, chunk)
            });
        }
    });
}

/// The plain definition, one row at a time over dense matrices: the oracle the paged ops are
/// tested against. `a: [rank, in_dim]`, `b: [out_dim, rank]` as PEFT stores them.
pub fn reference_row(x: &[f32], a: &[f32], b: &[f32], rank: usize, scale: f32, y: &mut [f32]) {
    let in_dim = x.len();
    let v: Vec<f32> = (0..rank).map(|k| (0..in_dim).map(|j| x[j] * a[k * in_dim + j]).sum()).collect();
    for (o, yo) in y.iter_mut().enumerate() {
        *yo += scale * (0..rank).map(|k| b[o * rank + k] * v[k]).sum::<f32>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::Lcg;

    /// A dense adapter module plus its copy written into scattered pages of a pool.
    struct Module {
        rank: usize,
        scale: f32,
        a: Vec<f32>,
        b: Vec<f32>,
        a_pages: Vec<u32>,
        bt_pages: Vec<u32>,
    }

    fn place(pool: &mut Vec<f32>, pe: usize, free: &mut Vec<u32>, rows: &[Vec<f32>]) -> Vec<u32> {
        let mut table = Vec::new();
        for row in rows {
            for chunk in row.chunks(pe) {
                let p = free.pop().expect("pool has room");
                let s = p as usize * pe;
                pool[s..s + chunk.len()].copy_from_slice(chunk);
                table.push(p);
            }
        }
        table
    }

    fn build(ranks: &[usize], d: Dims, pe: usize, rng: &mut Lcg) -> (Vec<f32>, Vec<Module>) {
        let n_pages = 4096;
        let mut pool = vec![f32::NAN; n_pages * pe];
        // Hand pages out in a scrambled order so tables are not contiguous.
        let mut free: Vec<u32> = (0..n_pages as u32).map(|i| i.wrapping_mul(2654435761u32) % n_pages as u32).collect();
        free.sort_unstable();
        free.dedup();
        free.reverse();
        let free_len = free.len();
        free.rotate_left(free_len / 3);
        let mut mods = Vec::new();
        for (i, &rank) in ranks.iter().enumerate() {
            let a = rng.vec(rank * d.in_dim);
            let b = rng.vec(d.out_dim * rank);
            let a_rows: Vec<Vec<f32>> = a.chunks(d.in_dim).map(<[f32]>::to_vec).collect();
            let bt_rows: Vec<Vec<f32>> = (0..rank).map(|k| (0..d.out_dim).map(|o| b[o * rank + k]).collect()).collect();
            let a_pages = place(&mut pool, pe, &mut free, &a_rows);
            let bt_pages = place(&mut pool, pe, &mut free, &bt_rows);
            mods.push(Module { rank, scale: 0.5 + i as f32, a, b, a_pages, bt_pages });
        }
        (pool, mods)
    }

    fn view(m: &Module) -> LoraModuleView<'_> {
        LoraModuleView { rank: m.rank, scale: m.scale, a_pages: &m.a_pages, bt_pages: &m.bt_pages }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// The pool's values in each form a pool holds, with a function that rounds a dense matrix
    /// the way that form stores it (for the reference).
    fn forms(pool: &[f32]) -> [(PageValues<'_>, Box<dyn Fn(&[f32]) -> Vec<f32>>); 2] {
        use crate::floats::{bf16_to_f32, f32_to_bf16};
        let bf16: &'static [u16] = Box::leak(pool.iter().map(|&v| f32_to_bf16(v)).collect());
        [
            (PageValues::F32(pool), Box::new(<[f32]>::to_vec)),
            (PageValues::Bf16(bf16), Box::new(|m: &[f32]| m.iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect())),
        ]
    }

    #[test]
    fn bgmv_mixed_ranks_matches_reference() {
        let mut rng = Lcg(1);
        let d = Dims { in_dim: 40, out_dim: 24 };
        let (pool, mods) = build(&[4, 8, 16, 64, 100], d, 16, &mut rng);
        let which = [Some(0), None, Some(3), Some(1), Some(4), Some(2), None, Some(3), Some(0)];
        let x = rng.vec(which.len() * d.in_dim);
        let y0 = rng.vec(which.len() * d.out_dim);
        for (pages, round) in forms(&pool) {
            let pool = PagePool { pages, page_elems: 16 };
            let mut y = y0.clone();
            let rows: Vec<_> = which.iter().map(|w| w.map(|i| view(&mods[i]))).collect();
            bgmv(pool, &x, &mut y, d, &rows);
            let mut want = y0.clone();
            for (i, w) in which.iter().enumerate() {
                if let Some(j) = w {
                    let m = &mods[*j];
                    let yi = &mut want[i * d.out_dim..(i + 1) * d.out_dim];
                    reference_row(
                        &x[i * d.in_dim..(i + 1) * d.in_dim],
                        &round(&m.a),
                        &round(&m.b),
                        m.rank,
                        m.scale,
                        yi,
                    );
                }
            }
            assert!(max_diff(&y, &want) < 1e-4, "{}", max_diff(&y, &want));
            // Rows without an adapter are untouched, bit for bit.
            assert_eq!(y[d.out_dim..2 * d.out_dim], y0[d.out_dim..2 * d.out_dim]);
        }
    }

    #[test]
    fn sgmv_segments_match_reference() {
        let mut rng = Lcg(2);
        let d = Dims { in_dim: 33, out_dim: 50 };
        let (pool, mods) = build(&[4, 8, 16, 64], d, 32, &mut rng);
        let plan = [(0usize, 5usize, Some(2usize)), (5, 1, None), (6, 19, Some(3)), (25, 3, Some(0)), (28, 9, Some(1))];
        let n = 37;
        let x = rng.vec(n * d.in_dim);
        let y0 = rng.vec(n * d.out_dim);
        for (pages, round) in forms(&pool) {
            let pool = PagePool { pages, page_elems: 32 };
            let mut y = y0.clone();
            let segs: Vec<Segment<'_>> =
                plan.iter().map(|&(start, len, m)| Segment { start, len, module: m.map(|i| view(&mods[i])) }).collect();
            sgmv(pool, &x, &mut y, d, &segs);
            let mut want = y0.clone();
            for &(start, len, m) in &plan {
                let Some(j) = m else { continue };
                let m = &mods[j];
                let (a, b) = (round(&m.a), round(&m.b));
                for r in start..start + len {
                    let yr = &mut want[r * d.out_dim..(r + 1) * d.out_dim];
                    reference_row(&x[r * d.in_dim..(r + 1) * d.in_dim], &a, &b, m.rank, m.scale, yr);
                }
            }
            assert!(max_diff(&y, &want) < 1e-4, "{}", max_diff(&y, &want));
        }
    }
}
