//! Paged attention, CPU reference: causal grouped-query attention of many sequences, each
//! reading its keys and values through its own block table (vLLM's paged KV layout).
//!
//! The cache of one layer is `[block][offset][kv_head][head_dim]`, `block_size` offsets a block;
//! token `p` of a sequence lives in block `table[p / block_size]`, offset `p % block_size`.

use rayon::prelude::*;

use crate::head::{HeadContext, KvValue, attend};

/// One layer's key and value caches (read-only view), in f32 or bf16 ([`KvValue`]).
pub struct KvLayer<'a, T = f32> {
    /// Keys, `[blocks, block_size, kv_heads, head_dim]`.
    pub k: &'a [T],
    /// Values, same layout.
    pub v: &'a [T],
}

impl<T> Clone for KvLayer<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for KvLayer<'_, T> {}

/// Geometry shared by every call.
#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Query heads (a multiple of `kv_heads`).
    pub heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl KvShape {
    /// Floats of one token's keys (all KV heads).
    pub fn token_elems(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Floats of one block.
    pub fn block_elems(&self) -> usize {
        self.block_size * self.token_elems()
    }

    /// Offset of `token` of a sequence with block table `table`.
    #[inline]
    pub fn offset(&self, table: &[u32], token: usize) -> usize {
        table[token / self.block_size] as usize * self.block_elems() + (token % self.block_size) * self.token_elems()
    }
}

/// One sequence's part of a call.
#[derive(Clone, Copy, Debug)]
pub struct SeqAttention<'a> {
    /// First row of this sequence's queries in `q` / `out`.
    pub row: usize,
    /// New tokens (query rows) of this sequence.
    pub new_tokens: usize,
    /// Tokens in the cache including the new ones; query `t` sits at `context - new_tokens + t`.
    pub context: usize,
    /// The sequence's block table.
    pub blocks: &'a [u32],
}

/// Writes the new tokens' keys and values (`[rows, kv_heads, head_dim]`) into the cache at the
/// positions `context - new_tokens ..` of each sequence (rounded to bf16 in a bf16 cache).
pub fn write_kv<T: KvValue>(
    shape: KvShape,
    k_cache: &mut [T],
    v_cache: &mut [T],
    k: &[f32],
    v: &[f32],
    seqs: &[SeqAttention<'_>],
) {
    let te = shape.token_elems();
    for s in seqs {
        for t in 0..s.new_tokens {
            let at = shape.offset(s.blocks, s.context - s.new_tokens + t);
            let src = (s.row + t) * te;
            for (c, &x) in k_cache[at..at + te].iter_mut().zip(&k[src..src + te]) {
                *c = T::from_f32(x);
            }
            for (c, &x) in v_cache[at..at + te].iter_mut().zip(&v[src..src + te]) {
                *c = T::from_f32(x);
            }
        }
    }
}

/// Causal attention for every sequence: `q: [rows, heads, head_dim]` → `out: [rows, heads *
/// head_dim]`, softmax in f32, scores scaled by `scale`; under a sliding `window` (in tokens,
/// itself included) a query sees only the last `window` tokens up to its own.
pub fn paged_attention<T: KvValue>(
    shape: KvShape,
    cache: KvLayer<'_, T>,
    q: &[f32],
    out: &mut [f32],
    seqs: &[SeqAttention<'_>],
    scale: f32,
    window: Option<usize>,
) {
    let hd = shape.head_dim;
    let group = shape.heads / shape.kv_heads;
    let row_elems = shape.heads * hd;
    out.par_chunks_mut(row_elems).enumerate().for_each(|(row, o)| {
        // Which sequence and which of its new tokens this query row is (rows of no sequence
        // are left as they are).
        let Some(s) = seqs.iter().find(|s| (s.row..s.row + s.new_tokens).contains(&row)) else { return };
        let t = row - s.row;
        let pos = s.context - s.new_tokens + t;
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w.max(1)));
        SCRATCH.with_borrow_mut(|(rows, scores)| {
            rows.clear();
            rows.extend((first..=pos).map(|j| shape.offset(s.blocks, j)));
            scores.resize(rows.len().max(scores.len()), 0.0);
            let ctx = HeadContext::new(cache.k, cache.v, rows);
            for h in 0..shape.heads {
                let ctx = ctx.at_head((h / group) * hd);
                attend(&q[row * row_elems + h * hd..][..hd], ctx, scale, scores, &mut o[h * hd..(h + 1) * hd]);
            }
        });
    });
}

thread_local! {
    /// One query row's context row offsets and attention scores, reused by every row a thread
    /// computes.
    static SCRATCH: std::cell::RefCell<(Vec<usize>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::Lcg;

    /// Dense causal attention of one sequence: the oracle.
    fn dense(q: &[f32], k: &[f32], v: &[f32], n: usize, shape: KvShape, scale: f32) -> Vec<f32> {
        let (hd, g) = (shape.head_dim, shape.heads / shape.kv_heads);
        let mut out = vec![0f32; n * shape.heads * hd];
        for t in 0..n {
            for h in 0..shape.heads {
                let qh = &q[(t * shape.heads + h) * hd..][..hd];
                let kvh = h / g;
                let s: Vec<f32> = (0..=t)
                    .map(|j| {
                        qh.iter().zip(&k[(j * shape.kv_heads + kvh) * hd..][..hd]).map(|(a, b)| a * b).sum::<f32>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..hd {
                        out[(t * shape.heads + h) * hd + d] += ej / z * v[(j * shape.kv_heads + kvh) * hd + d];
                    }
                }
            }
        }
        out
    }

    /// Every head width the one-pass kernels are written for (64, 128, 256) and one they are
    /// not (8, the portable pass).
    #[test]
    fn paged_matches_dense_across_scattered_blocks() {
        for hd in [8, 64, 128, 256] {
            paged_matches_dense(hd);
        }
    }

    fn paged_matches_dense(hd: usize) {
        let shape = KvShape { block_size: 4, kv_heads: 2, heads: 6, head_dim: hd };
        let mut lcg = Lcg(7);
        let mut rnd = |n: usize| lcg.vec(n);
        let blocks = 16;
        let mut kc = vec![0f32; blocks * shape.block_elems()];
        let mut vc = kc.clone();
        // Two sequences: A (11 tokens, prefilled in two chunks) and B (6 tokens at once).
        let (na, nb) = (11, 6);
        let (qa, ka, va) = (rnd(na * 6 * hd), rnd(na * 2 * hd), rnd(na * 2 * hd));
        let (qb, kb, vb) = (rnd(nb * 6 * hd), rnd(nb * 2 * hd), rnd(nb * 2 * hd));
        let table_a = [9u32, 2, 14];
        let table_b = [5u32, 0];
        let te = shape.token_elems();
        let qe = shape.heads * shape.head_dim;
        // Step 1: A's first 7 tokens alone.
        let s1 = [SeqAttention { row: 0, new_tokens: 7, context: 7, blocks: &table_a }];
        write_kv(shape, &mut kc, &mut vc, &ka[..7 * te], &va[..7 * te], &s1);
        let mut out1 = vec![0f32; 7 * qe];
        paged_attention(shape, KvLayer { k: &kc, v: &vc }, &qa[..7 * qe], &mut out1, &s1, 0.35, None);
        // Step 2: A's last 4 tokens and all of B, in one call.
        let s2 = [
            SeqAttention { row: 0, new_tokens: 4, context: 11, blocks: &table_a },
            SeqAttention { row: 4, new_tokens: 6, context: 6, blocks: &table_b },
        ];
        let k2 = [&ka[7 * te..], &kb[..]].concat();
        let v2 = [&va[7 * te..], &vb[..]].concat();
        let q2 = [&qa[7 * qe..], &qb[..]].concat();
        write_kv(shape, &mut kc, &mut vc, &k2, &v2, &s2);
        let mut out2 = vec![0f32; 10 * qe];
        paged_attention(shape, KvLayer { k: &kc, v: &vc }, &q2, &mut out2, &s2, 0.35, None);
        let want_a = dense(&qa, &ka, &va, na, shape, 0.35);
        let want_b = dense(&qb, &kb, &vb, nb, shape, 0.35);
        let got_a = [&out1[..], &out2[..4 * qe]].concat();
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff(&got_a, &want_a) < 1e-5, "head width {hd}");
        assert!(diff(&out2[4 * qe..], &want_b) < 1e-5, "head width {hd}");

        // A sliding window as wide as the context changes nothing; a window of one token gives
        // each query its own value (every head of a KV group the same).
        let mut wide = vec![0f32; 10 * qe];
        paged_attention(shape, KvLayer { k: &kc, v: &vc }, &q2, &mut wide, &s2, 0.35, Some(11));
        assert!(diff(&wide, &out2) < 1e-6, "head width {hd}");
        let mut own = vec![0f32; 10 * qe];
        paged_attention(shape, KvLayer { k: &kc, v: &vc }, &q2, &mut own, &s2, 0.35, Some(1));
        let token = 10; // A's last token
        for h in 0..shape.heads {
            let kvh = h / (shape.heads / shape.kv_heads);
            let want = &va[(token * shape.kv_heads + kvh) * hd..][..hd];
            assert!(diff(&own[3 * qe + h * hd..][..hd], want) < 1e-6, "head width {hd}, head {h}");
        }
    }
}
