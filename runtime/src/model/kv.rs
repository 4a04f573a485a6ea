//! The paged key/value cache: fixed-size blocks of 16 tokens from one pool sized in bytes,
//! handed to sequences through block tables (vLLM's PagedAttention layout).

use openlora_kernels::attention::{KvLayer, KvShape, SeqAttention, paged_attention, write_kv};
use openlora_kernels::head::KvValue;

use crate::shape::ModelConfig;

/// Tokens per KV block.
pub const BLOCK_SIZE: usize = 16;

/// Whether a request for blocks can be met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocStatus {
    /// Enough blocks are free now.
    Ok,
    /// Not now, but the pool is large enough once other sequences finish.
    Later,
    /// More blocks than the whole pool holds.
    Impossible,
}

/// One sequence's block table and how many of its tokens are in the cache.
#[derive(Debug, Default, Clone)]
pub struct SeqKv {
    blocks: Vec<u32>,
    len: usize,
}

impl SeqKv {
    /// Tokens stored (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks held.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
}

/// The free-block list of a KV pool and the block tables it hands out: the bookkeeping every
/// backend shares (the CPU keeps the blocks in host memory, a GPU in device memory).
#[derive(Debug, Clone)]
pub struct BlockPool {
    free: Vec<u32>,
    total: usize,
}

fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_SIZE)
}

impl BlockPool {
    /// Bytes one block takes across all layers, keys and values, at `value_bytes` a value.
    pub fn block_bytes(cfg: &ModelConfig, value_bytes: usize) -> usize {
        2 * cfg.num_layers * BLOCK_SIZE * cfg.num_kv_heads * cfg.head_dim * value_bytes
    }

    /// A pool of `total` blocks, all free.
    pub fn new(total: usize) -> Self {
        BlockPool { free: (0..total as u32).rev().collect(), total }
    }

    /// Blocks free now.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.total
    }

    /// Blocks `seq` needs beyond what it holds to store `new_tokens` more tokens.
    pub fn extra_blocks(seq: &SeqKv, new_tokens: usize) -> usize {
        blocks_for(seq.len + new_tokens).saturating_sub(seq.blocks.len())
    }

    /// Whether `extra` more blocks could be had (for a sequence needing `total_needed` in all).
    pub fn can_allocate(&self, extra: usize, total_needed: usize) -> AllocStatus {
        if total_needed > self.total {
            AllocStatus::Impossible
        } else if extra > self.free.len() {
            AllocStatus::Later
        } else {
            AllocStatus::Ok
        }
    }

    /// Gives `seq` blocks for `new_tokens` more tokens if they can be had now.
    pub fn reserve(&mut self, seq: &mut SeqKv, new_tokens: usize) -> AllocStatus {
        let extra = Self::extra_blocks(seq, new_tokens);
        let status = self.can_allocate(extra, blocks_for(seq.len + new_tokens));
        if status == AllocStatus::Ok {
            let at = self.free.len() - extra;
            seq.blocks.extend(self.free.drain(at..));
        }
        status
    }

    /// Returns every block of `seq` to the pool and empties it.
    pub fn release(&mut self, seq: &mut SeqKv) {
        self.free.append(&mut seq.blocks);
        seq.len = 0;
    }

    /// Marks `n` tokens written by the step just run as part of `seq`.
    pub fn commit(seq: &mut SeqKv, n: usize) {
        seq.len += n;
    }
}

/// What the host KV cache keeps keys and values in (config `memory.kv_cache_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDType {
    /// 32-bit floats (the default).
    F32,
    /// bfloat16, as transformers computing in bf16 keeps them: half the bytes attention reads.
    Bf16,
}

impl std::str::FromStr for KvDType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(KvDType::F32),
            "bf16" | "bfloat16" => Ok(KvDType::Bf16),
            _ => Err(format!("unknown KV cache dtype `{s}`; expected f32 or bf16")),
        }
    }
}

impl<'de> serde::Deserialize<'de> for KvDType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl KvDType {
    /// The canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            KvDType::F32 => "f32",
            KvDType::Bf16 => "bf16",
        }
    }

    /// Bytes one value takes.
    pub fn value_bytes(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::Bf16 => 2,
        }
    }
}

/// Every layer's key and value pools, in the cache's dtype.
enum Pools {
    F32(Vec<(Vec<f32>, Vec<f32>)>),
    Bf16(Vec<(Vec<u16>, Vec<u16>)>),
}

/// The KV pool of every layer in host memory (f32 or bf16), and its block bookkeeping.
pub struct PagedKvCache {
    shape: KvShape,
    pools: Pools,
    blocks: BlockPool,
}

impl PagedKvCache {
    /// Bytes one block takes across all layers (keys and values) in `dtype`.
    pub fn block_bytes(cfg: &ModelConfig, dtype: KvDType) -> usize {
        BlockPool::block_bytes(cfg, dtype.value_bytes())
    }

    /// A pool of `num_blocks` blocks in `dtype`.
    pub fn new(cfg: &ModelConfig, num_blocks: usize, dtype: KvDType) -> Self {
        let shape = KvShape {
            block_size: BLOCK_SIZE,
            kv_heads: cfg.num_kv_heads,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim,
        };
        let elems = num_blocks * shape.block_elems();
        let layers = 0..cfg.num_layers;
        let pools = match dtype {
            KvDType::F32 => Pools::F32(layers.map(|_| (vec![0.0; elems], vec![0.0; elems])).collect()),
            KvDType::Bf16 => Pools::Bf16(layers.map(|_| (vec![0; elems], vec![0; elems])).collect()),
        };
        PagedKvCache { shape, pools, blocks: BlockPool::new(num_blocks) }
    }

    /// A pool using at most `bytes` bytes.
    pub fn with_bytes(cfg: &ModelConfig, bytes: usize, dtype: KvDType) -> Self {
        Self::new(cfg, bytes / Self::block_bytes(cfg, dtype), dtype)
    }

    /// A pool just large enough for `seqs` sequences of `max_tokens` tokens each.
    pub fn for_sequences(cfg: &ModelConfig, seqs: usize, max_tokens: usize, dtype: KvDType) -> Self {
        Self::new(cfg, seqs * blocks_for(max_tokens), dtype)
    }

    /// The cache's geometry.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Its block bookkeeping.
    pub fn blocks(&self) -> &BlockPool {
        &self.blocks
    }

    /// Its block bookkeeping, to hand out or take back blocks.
    pub fn blocks_mut(&mut self) -> &mut BlockPool {
        &mut self.blocks
    }

    /// Blocks free now.
    pub fn free_blocks(&self) -> usize {
        self.blocks.free_blocks()
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.blocks.total_blocks()
    }

    /// Gives `seq` blocks for `new_tokens` more tokens if they can be had now ([`BlockPool::reserve`]).
    pub fn reserve(&mut self, seq: &mut SeqKv, new_tokens: usize) -> AllocStatus {
        self.blocks.reserve(seq, new_tokens)
    }

    /// Returns every block of `seq` to the pool and empties it.
    pub fn release(&mut self, seq: &mut SeqKv) {
        self.blocks.release(seq)
    }

    /// Layer `l` of one step: writes the new tokens' keys `k` and values `v` (`[rows, kv_heads,
    /// head_dim]`, f32) into the cache, then attends every query row of `q` over its sequence's
    /// context into `out` (see [`paged_attention`]).
    pub(crate) fn write_and_attend(
        &mut self,
        l: usize,
        (k, v, q): (&[f32], &[f32], &[f32]),
        out: &mut [f32],
        seqs: &[SeqAttention<'_>],
        scale: f32,
        window: Option<usize>,
    ) {
        fn run<T: KvValue>(
            shape: KvShape,
            (kc, vc): &mut (Vec<T>, Vec<T>),
            (k, v, q): (&[f32], &[f32], &[f32]),
            out: &mut [f32],
            seqs: &[SeqAttention<'_>],
            scale: f32,
            window: Option<usize>,
        ) {
            write_kv(shape, kc, vc, k, v, seqs);
            paged_attention(shape, KvLayer { k: kc, v: vc }, q, out, seqs, scale, window);
        }
        match &mut self.pools {
            Pools::F32(layers) => run(self.shape, &mut layers[l], (k, v, q), out, seqs, scale, window),
            Pools::Bf16(layers) => run(self.shape, &mut layers[l], (k, v, q), out, seqs, scale, window),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig {
            model_type: "llama".into(),
            family: crate::shape::Family::Llama,
            layer_windows: vec![None],
            rope_local_theta: None,
            query_pre_attn_scalar: None,
            final_logit_softcapping: None,
            vocab_size: 8,
            hidden_size: 8,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: super::super::RopeScaling::Default,
            max_position_embeddings: 512,
            tie_word_embeddings: true,
            dtype: None,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn allocation_answers_ok_later_impossible() {
        let mut kv = PagedKvCache::new(&cfg(), 4, KvDType::F32);
        let mut a = SeqKv::default();
        assert_eq!(kv.reserve(&mut a, 17), AllocStatus::Ok); // two blocks
        assert_eq!(a.blocks().len(), 2);
        BlockPool::commit(&mut a, 17);
        assert_eq!(kv.reserve(&mut a, 15), AllocStatus::Ok, "fits in the second block");
        assert_eq!(a.blocks().len(), 2);
        let mut b = SeqKv::default();
        assert_eq!(kv.reserve(&mut b, 48), AllocStatus::Later);
        assert_eq!(kv.reserve(&mut b, 80), AllocStatus::Impossible);
        assert!(b.blocks().is_empty(), "a refused reservation takes nothing");
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 4);
        assert_eq!(kv.reserve(&mut b, 48), AllocStatus::Ok);
    }
}
