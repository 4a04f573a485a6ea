//! The Llama decoder on the GPU: bf16 weights, cuBLAS GEMMs, NVRTC kernels, a paged KV cache in
//! device memory, and per-row LoRA adapters from the device page pool — the same flat-batch
//! step as the CPU backend ([`crate::model::Llama::forward`]): every sequence's new tokens laid
//! end to end share each projection's GEMM; attention reads each sequence's own block table.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use half::bf16;

use super::lora::{GpuAdapters, LoraRows, ShareSums};
use super::step::{Step, StepBuffers};
use super::{Gpu, cuda_err, grid};
use crate::error::{Error, Result};
use crate::model::lora::AdapterShare;
use crate::model::{BLOCK_SIZE, BlockPool, ModelConfig, Proj, rope};
use crate::shape::LayerExtras;

/// Threads per block of the row kernels.
const BLOCK: u32 = 256;

/// Threads per block of the attention kernels; each accumulates at most 4 of a head's
/// dimensions (`ATTN_DIMS` in attention.cu).
const ATTENTION_BLOCK: u32 = 128;

/// The launch of the attention kernels for `heads` heads of `rows` query rows (or sequences):
/// rows go in the grid's x dimension, which holds 2³¹ − 1 blocks (y holds 65,535).
pub(crate) fn attention_grid(heads: usize, rows: usize) -> cudarc::driver::LaunchConfig {
    grid((rows as u32, heads as u32), ATTENTION_BLOCK, 0)
}

/// The widest head the attention kernels take.
pub const MAX_HEAD_DIM: usize = 4 * ATTENTION_BLOCK as usize;

/// Refuses a model whose heads the attention kernels cannot hold.
pub(crate) fn check_shape(cfg: &ModelConfig) -> Result<()> {
    if cfg.head_dim > MAX_HEAD_DIM {
        return Err(Error::device(format!(
            "head_dim {} is beyond the {MAX_HEAD_DIM} the GPU attention kernels take",
            cfg.head_dim
        )));
    }
    Ok(())
}

/// One decoder layer's weights on the device, bf16 row-major.
pub struct GpuLayer {
    /// q, k, v, o, gate, up, down: `[out, in]` row-major, indexed by `Proj as usize`.
    pub proj: Vec<CudaSlice<bf16>>,
    /// The input norm, `[hidden]`.
    pub input_norm: CudaSlice<bf16>,
    /// The post-attention norm, `[hidden]`.
    pub post_norm: CudaSlice<bf16>,
    /// The q, k and v biases, in families that have them (Qwen2).
    pub qkv_bias: Option<[CudaSlice<bf16>; 3]>,
    /// The per-head RMSNorm weights of q and k `[head_dim]`, in families that have them (Qwen3,
    /// Gemma 3).
    pub qk_norm: Option<[CudaSlice<bf16>; 2]>,
    /// The norms before and after the MLP `[hidden]`, in families with norms on both sides
    /// (Gemma 3; `post_norm` is then the attention output's).
    pub ffn_norms: Option<[CudaSlice<bf16>; 2]>,
}

/// A Llama-family decoder resident on one GPU.
pub struct GpuLlama {
    cfg: ModelConfig,
    embed: CudaSlice<bf16>,
    layers: Vec<GpuLayer>,
    norm: CudaSlice<bf16>,
    /// `None`: tied to the embedding.
    lm_head: Option<CudaSlice<bf16>>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    /// The sliding layers' RoPE tables, where their base differs (Gemma 3).
    local_rope: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    /// Every step's device buffers, kept from one step to the next.
    step: std::sync::Mutex<StepBuffers>,
}

/// The KV cache in device memory: per layer `[blocks, block_size, kv_heads, head_dim]` (bf16),
/// the layout of the CPU reference, handed out by the same [`BlockPool`] as the CPU's.
pub struct GpuKv {
    k: Vec<CudaSlice<bf16>>,
    v: Vec<CudaSlice<bf16>>,
    /// Its block bookkeeping.
    pub blocks: BlockPool,
}

impl GpuKv {
    /// Bytes one block takes across all layers (keys and values, bf16).
    pub fn block_bytes(cfg: &ModelConfig) -> usize {
        BlockPool::block_bytes(cfg, 2)
    }

    /// A cache of `blocks` blocks of [`BLOCK_SIZE`] tokens for `cfg`'s layers.
    pub fn new(gpu: &Gpu, cfg: &ModelConfig, blocks: usize) -> Result<Self> {
        let n = blocks * BLOCK_SIZE * cfg.num_kv_heads * cfg.head_dim;
        let mut k = Vec::with_capacity(cfg.num_layers);
        let mut v = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            k.push(gpu.zeros::<bf16>(n)?);
            v.push(gpu.zeros::<bf16>(n)?);
        }
        Ok(GpuKv { k, v, blocks: BlockPool::new(blocks) })
    }
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy)]
pub struct GpuSeq<'a> {
    /// Its new tokens.
    pub tokens: &'a [u32],
    /// Tokens already in its cache (the position of `tokens[0]`).
    pub start: usize,
    /// Its KV blocks (enough for `start + tokens.len()`).
    pub blocks: &'a [u32],
    /// Its adapter's bank in the device pool, if any.
    pub adapter: Option<u32>,
}

/// `y[rows, out] = x[rows, in] · W[out, in]ᵀ` (row-major) on cuBLAS: in column-major terms
/// `Yᵀ = W · Xᵀ`, so W is the transposed operand.
fn linear(
    gpu: &Gpu,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
    rows: usize,
    dims: (usize, usize),
) -> Result<()> {
    let (out, inp) = dims;
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: out as i32,
        n: rows as i32,
        k: inp as i32,
        alpha: bf16::ONE,
        lda: inp as i32,
        ldb: inp as i32,
        beta: bf16::ZERO,
        ldc: out as i32,
    };
    // SAFETY: w holds out×inp values, x rows×inp and y rows×out (the callers size them so).
    unsafe { gpu.blas.gemm(cfg, w, x, y) }.map_err(cuda_err)
}

/// The per-row and per-sequence arrays of a step, in the order they sit in its one upload.
#[derive(Debug, Clone, Copy)]
enum Part {
    /// Token id per row.
    Ids,
    /// Position per row.
    Positions,
    /// KV cache bank per row (block × block size + offset).
    Banks,
    /// Sequence index per row.
    RowSeq,
    /// Block table per sequence, `max_blocks` wide.
    Tables,
    /// Cached tokens per sequence, the new ones included.
    ContextLens,
    /// First row per sequence (i32).
    SegStart,
    /// Rows per sequence (i32).
    SegLen,
    /// Adapter bank per sequence, or -1 (i32).
    SegAdapter,
    /// Adapter bank per row, or -1 (i32).
    RowAdapter,
    /// The rows whose logits are wanted.
    OutRows,
}

const PARTS: usize = 11;

/// Description of a step, laid out on the host (`B` = `Vec<u32>`), then uploaded in one copy
/// (`B` = `CudaSlice<u32>`) and read by every layer.
struct StepPlan<B = CudaSlice<u32>> {
    rows: usize,
    seqs: usize,
    decode: bool,
    max_context: usize,
    max_blocks: usize,
    any_adapter: bool,
    n_out: usize,
    /// Every [`Part`] end to end (i32 parts as their bits).
    buf: B,
    ranges: [std::ops::Range<usize>; PARTS],
}

impl StepPlan<Vec<u32>> {
    /// Lays out a step of `seqs` (checking each fits its blocks, the context and the vocabulary).
    fn layout(cfg: &ModelConfig, block_size: usize, seqs: &[GpuSeq<'_>], all_rows: bool) -> Result<Self> {
        let mut parts: [Vec<u32>; PARTS] = Default::default();
        let max_blocks = seqs.iter().map(|s| s.blocks.len()).max().unwrap_or(1).max(1);
        parts[Part::Tables as usize] = vec![0u32; seqs.len() * max_blocks];
        let mut rows = 0usize;
        for (i, s) in seqs.iter().enumerate() {
            let end = s.start + s.tokens.len();
            // Requests were validated before they reached the engine (`crate::request`); these
            // are the device's own bounds, kept because breaking them would write outside
            // device buffers rather than fail.
            if s.tokens.is_empty() || end > cfg.max_position_embeddings || end > s.blocks.len() * block_size {
                return Err(Error::device(format!(
                    "sequence {i}: {} new tokens at {} do not fit its blocks or the context",
                    s.tokens.len(),
                    s.start
                )));
            }
            if let Some(bad) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::device(format!("token id {bad} is outside the vocabulary")));
            }
            parts[Part::Tables as usize][i * max_blocks..i * max_blocks + s.blocks.len()].copy_from_slice(s.blocks);
            // i32 parts travel as their bits: -1 (no adapter) is 0xffff_ffff.
            let adapter = s.adapter.map_or(-1i32, |a| a as i32) as u32;
            parts[Part::SegStart as usize].push(rows as u32);
            parts[Part::SegLen as usize].push(s.tokens.len() as u32);
            parts[Part::SegAdapter as usize].push(adapter);
            parts[Part::ContextLens as usize].push(end as u32);
            for (t, &id) in s.tokens.iter().enumerate() {
                let pos = s.start + t;
                if all_rows || t + 1 == s.tokens.len() {
                    parts[Part::OutRows as usize].push(rows as u32);
                }
                parts[Part::Ids as usize].push(id);
                parts[Part::Positions as usize].push(pos as u32);
                parts[Part::Banks as usize]
                    .push(s.blocks[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
                parts[Part::RowSeq as usize].push(i as u32);
                parts[Part::RowAdapter as usize].push(adapter);
                rows += 1;
            }
        }
        let mut flat = Vec::with_capacity(parts.iter().map(Vec::len).sum());
        let ranges = parts.each_ref().map(|p| {
            let start = flat.len();
            flat.extend_from_slice(p);
            start..flat.len()
        });
        Ok(StepPlan {
            rows,
            seqs: seqs.len(),
            decode: seqs.iter().all(|s| s.tokens.len() == 1),
            max_context: parts[Part::ContextLens as usize].iter().copied().max().unwrap_or(1) as usize,
            max_blocks,
            any_adapter: seqs.iter().any(|s| s.adapter.is_some()),
            n_out: parts[Part::OutRows as usize].len(),
            buf: flat,
            ranges,
        })
    }

    /// One part, on the host.
    #[cfg(test)]
    fn host_part(&self, p: Part) -> &[u32] {
        &self.buf[self.ranges[p as usize].clone()]
    }

    /// The plan on the device, in one copy into `buf` (at least as long).
    fn upload(self, gpu: &Gpu, mut buf: CudaSlice<u32>) -> Result<StepPlan> {
        if !self.buf.is_empty() {
            gpu.stream.memcpy_htod(&self.buf, &mut buf.slice_mut(0..self.buf.len())).map_err(cuda_err)?;
        }
        let StepPlan { rows, seqs, decode, max_context, max_blocks, any_adapter, n_out, ranges, .. } = self;
        Ok(StepPlan { rows, seqs, decode, max_context, max_blocks, any_adapter, n_out, buf, ranges })
    }
}

impl StepPlan {
    /// One part of the upload, for a kernel argument.
    fn part(&self, p: Part) -> CudaView<'_, u32> {
        let r = self.ranges[p as usize].clone();
        // An empty part still names a valid address (the kernels never read it).
        if r.is_empty() { self.buf.slice(0..1) } else { self.buf.slice(r) }
    }
}

/// Checks a layer's group of weights beyond Llama's against what its family names (`want`):
/// present exactly when named, each of the length named.
fn check_group<const N: usize>(
    l: usize,
    what: &str,
    got: &Option<[CudaSlice<bf16>; N]>,
    want: &Option<[crate::shape::config::Named; N]>,
) -> Result<()> {
    match (got, want) {
        (Some(got), Some(want)) => {
            for (w, (name, len)) in got.iter().zip(want) {
                if w.len() != *len {
                    return Err(Error::device(format!(
                        "{name} holds {} values; the model's shape needs {len}",
                        w.len()
                    )));
                }
            }
            Ok(())
        }
        (None, None) => Ok(()),
        _ => Err(Error::device(format!("layer {l}: {what} do not match the model's family"))),
    }
}

impl GpuLlama {
    /// Uploads a model folder's weights as bf16.
    pub fn load(gpu: &Gpu, folder: &std::path::Path) -> Result<Self> {
        use candle_core::{DType, Device};
        let cfg = ModelConfig::from_file(&folder.join("config.json"))?;
        check_shape(&cfg)?;
        let files = crate::model::weights::WeightFiles::discover(folder)?;
        let w = crate::model::weights::WeightFiles::open(folder, &files)?;
        let up = |name: &str, shape: &[usize]| -> Result<CudaSlice<bf16>> {
            let t = w.load(name, shape, DType::BF16, &Device::Cpu)?;
            gpu.upload(&t.flatten_all()?.to_vec1::<bf16>()?)
        };
        // Norm weights as stored (w); the kernels add Gemma's 1 in f32, as transformers does.
        let up_norm = |name: &str, len: usize| up(name, &[len]);
        let h = cfg.hidden_size;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let proj = Proj::ALL
                .iter()
                .map(|&p| {
                    let (o, i) = p.shape(&cfg);
                    up(&p.tensor_name(l), &[o, i])
                })
                .collect::<Result<Vec<_>>>()?;
            let extras = cfg.layer_extras(l);
            let qkv_bias = LayerExtras::load(&extras.qkv_bias, |name, len| up(name, &[len]))?;
            let qk_norm = LayerExtras::load(&extras.qk_norm, up_norm)?;
            let ffn_norms = LayerExtras::load(&extras.ffn_norms, up_norm)?;
            let at = |name: &str| format!("model.layers.{l}.{name}");
            layers.push(GpuLayer {
                proj,
                input_norm: up_norm(&at("input_layernorm.weight"), h)?,
                post_norm: up_norm(&at("post_attention_layernorm.weight"), h)?,
                qkv_bias,
                qk_norm,
                ffn_norms,
            });
        }
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            None
        } else {
            Some(up("lm_head.weight", &[cfg.vocab_size, h])?)
        };
        let embed = up("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let norm = up_norm("model.norm.weight", h)?;
        Self::from_weights(gpu, &cfg, embed, layers, norm, lm_head)
    }

    /// A decoder of `cfg`'s shape from bf16 weights already on `gpu` (row-major): the embedding
    /// `[vocab, hidden]`, one [`GpuLayer`] per layer, the final norm `[hidden]` and the head
    /// `[vocab, hidden]` (`None`: tied to the embedding). Every length is checked against `cfg`.
    pub fn from_weights(
        gpu: &Gpu,
        cfg: &ModelConfig,
        embed: CudaSlice<bf16>,
        layers: Vec<GpuLayer>,
        norm: CudaSlice<bf16>,
        lm_head: Option<CudaSlice<bf16>>,
    ) -> Result<Self> {
        check_shape(cfg)?;
        let h = cfg.hidden_size;
        let check = |name: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(Error::device(format!("{name} holds {got} values; the model's shape needs {want}")))
            }
        };
        if layers.len() != cfg.num_layers {
            return Err(Error::device(format!("{} layers given; the model has {}", layers.len(), cfg.num_layers)));
        }
        check("model.embed_tokens.weight", embed.len(), cfg.vocab_size * h)?;
        check("model.norm.weight", norm.len(), h)?;
        if let Some(head) = &lm_head {
            check("lm_head.weight", head.len(), cfg.vocab_size * h)?;
        }
        for (l, layer) in layers.iter().enumerate() {
            if layer.proj.len() != Proj::ALL.len() {
                return Err(Error::device(format!("layer {l} has {} projections, not 7", layer.proj.len())));
            }
            for (&p, w) in Proj::ALL.iter().zip(&layer.proj) {
                let (o, i) = p.shape(cfg);
                check(&p.tensor_name(l), w.len(), o * i)?;
            }
            check(&format!("model.layers.{l}.input_layernorm.weight"), layer.input_norm.len(), h)?;
            check(&format!("model.layers.{l}.post_attention_layernorm.weight"), layer.post_norm.len(), h)?;
            let extras = cfg.layer_extras(l);
            check_group(l, "q/k/v biases", &layer.qkv_bias, &extras.qkv_bias)?;
            check_group(l, "q/k norms", &layer.qk_norm, &extras.qk_norm)?;
            check_group(l, "MLP norms", &layer.ffn_norms, &extras.ffn_norms)?;
        }
        let (cos, sin) = rope::cos_sin(cfg);
        let local_rope = match (0..cfg.num_layers).find(|&l| cfg.local_rope(l)) {
            Some(l) => {
                let (c, s) = rope::cos_sin(&cfg.rope_for_layer(l));
                Some((gpu.upload(&c)?, gpu.upload(&s)?))
            }
            None => None,
        };
        Ok(GpuLlama {
            embed,
            norm,
            layers,
            lm_head,
            cos: gpu.upload(&cos)?,
            sin: gpu.upload(&sin)?,
            local_rope,
            step: Default::default(),
            cfg: cfg.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// How many times a step buffer was allocated (the first steps, and larger steps after).
    pub fn step_allocations(&self) -> usize {
        self.step.lock().map_or(0, |b| b.grown)
    }

    /// Runs one step: writes the new tokens' keys and values into `kv` and gives back f32 logits
    /// `[rows, vocab]` of every row (`all_rows`) or of each sequence's last row, and each
    /// sequence's measured adapter share (the CPU backend's [`AdapterShare`]). The step's
    /// buffers are the model's own, allocated once and grown when a larger step comes.
    pub fn forward(
        &self,
        gpu: &Gpu,
        kv: &mut GpuKv,
        adapters: Option<&GpuAdapters>,
        seqs: &[GpuSeq<'_>],
        all_rows: bool,
    ) -> Result<Step<'_>> {
        let cfg = &self.cfg;
        let mut guard = self.step.lock().map_err(|_| Error::device("a step failed while holding its buffers"))?;
        let bufs = &mut *guard;
        let layout = StepPlan::layout(cfg, BLOCK_SIZE, seqs, all_rows)?;
        let plan_buf = bufs.plan.take(gpu, layout.buf.len(), &mut bufs.grown)?;
        let plan = layout.upload(gpu, plan_buf)?;
        // The widest rank in this step: the shrink's output width.
        let step_rank =
            adapters.map_or(0, |a| seqs.iter().filter_map(|s| s.adapter).map(|s| a.bank_rank(s)).max().unwrap_or(0));
        let adapters = adapters.filter(|_| plan.any_adapter && step_rank > 0);
        let n = plan.rows;
        let (h, nh, nkv, hd, inter) =
            (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size);
        let (eps, scale) = (cfg.rms_norm_eps as f32, cfg.attention_scale());
        // What every norm adds to its weight: Gemma's (1 + w), else w.
        let norm_offset: f32 = if cfg.family.norm_plus_one() { 1.0 } else { 0.0 };
        let (h_i, hd_i, nh_i, nkv_i, bs_i) = (h as i32, hd as i32, nh as i32, nkv as i32, BLOCK_SIZE as i32);
        let grown = &mut bufs.grown;
        let mut x = bufs.x.take(gpu, n * h, grown)?;
        let mut hn = bufs.hn.take(gpu, n * h, grown)?;
        let mut q = bufs.q.take(gpu, n * nh * hd, grown)?;
        let mut k = bufs.k.take(gpu, n * nkv * hd, grown)?;
        let mut v = bufs.v.take(gpu, n * nkv * hd, grown)?;
        let mut attn = bufs.attn.take(gpu, n * nh * hd, grown)?;
        let mut out = bufs.out.take(gpu, n * h, grown)?;
        let mut gate = bufs.gate.take(gpu, n * inter, grown)?;
        let mut up = bufs.up.take(gpu, n * inter, grown)?;
        let mut act = bufs.act.take(gpu, n * inter, grown)?;
        let mut lora_tmp = bufs.lora_tmp.take(gpu, n * step_rank.max(1), grown)?;
        let mut sums_buf = bufs.sums.take(gpu, 2 * plan.seqs, grown)?;
        let mut sums = ShareSums::new(gpu, &mut sums_buf, plan.seqs)?;
        let s = &gpu.stream;
        // SAFETY (every launch below): each kernel reads and writes within the buffers passed,
        // which are sized above from the same row count and widths the kernel is given.
        {
            let mut b = s.launch_builder(gpu.kernel("embedding_bf16")?);
            let ids = plan.part(Part::Ids);
            b.arg(&self.embed).arg(&ids).arg(&mut x).arg(&h_i);
            // SAFETY: the buffers passed were sized above for the rows and widths given.
            unsafe { b.launch(grid((n as u32, 1), BLOCK, 0)) }.map_err(cuda_err)?;
        }
        if cfg.family.scaled_embeddings() {
            // √hidden in bf16, as transformers scales bf16 embeddings.
            let (factor, len) = (bf16::from_f32((h as f32).sqrt()).to_f32(), (n * h) as i32);
            let mut b = s.launch_builder(gpu.kernel("scale_bf16")?);
            b.arg(&mut x).arg(&factor).arg(&len);
            // SAFETY: x holds n × hidden values, as the kernel is told.
            unsafe { b.launch(grid(((n * h).div_ceil(BLOCK as usize) as u32, 1), BLOCK, 0)) }.map_err(cuda_err)?;
        }
        let rms = |x: &CudaSlice<bf16>, w: &CudaSlice<bf16>, o: &mut CudaSlice<bf16>, rows: usize| -> Result<()> {
            let mut b = s.launch_builder(gpu.kernel("rms_norm_bf16")?);
            b.arg(x).arg(w).arg(o).arg(&h_i).arg(&eps).arg(&norm_offset);
            // SAFETY: the buffers passed were sized above for the rows and widths given.
            unsafe { b.launch(grid((rows as u32, 1), BLOCK, 0)) }.map(drop).map_err(cuda_err)
        };
        let add = |x: &mut CudaSlice<bf16>, y: &CudaSlice<bf16>, len: usize| -> Result<()> {
            let n_i = len as i32;
            let mut b = s.launch_builder(gpu.kernel("add_bf16")?);
            b.arg(x).arg(y).arg(&n_i);
            // SAFETY: the buffers passed were sized above for the rows and widths given.
            unsafe { b.launch(grid((len.div_ceil(BLOCK as usize) as u32, 1), BLOCK, 0)) }.map(drop).map_err(cuda_err)
        };
        let (positions, banks, tables) = (plan.part(Part::Positions), plan.part(Part::Banks), plan.part(Part::Tables));
        let (context_lens, row_seq) = (plan.part(Part::ContextLens), plan.part(Part::RowSeq));
        let lora_rows = plan_lora(&plan, step_rank);
        let bias = |y: &mut CudaSlice<bf16>, b: &CudaSlice<bf16>, cols: usize| -> Result<()> {
            let (rows_i, cols_i) = (n as i32, cols as i32);
            let mut k = s.launch_builder(gpu.kernel("add_bias_bf16")?);
            k.arg(y).arg(b).arg(&rows_i).arg(&cols_i);
            // SAFETY: y holds n × cols values and b cols, as the kernel is told.
            unsafe { k.launch(grid(((n * cols).div_ceil(BLOCK as usize) as u32, 1), BLOCK, 0)) }
                .map(drop)
                .map_err(cuda_err)
        };
        let head_norm = |t: &mut CudaSlice<bf16>, w: &CudaSlice<bf16>, heads: usize| -> Result<()> {
            let mut k = s.launch_builder(gpu.kernel("rms_norm_inplace_bf16")?);
            k.arg(t).arg(w).arg(&hd_i).arg(&eps).arg(&norm_offset);
            // SAFETY: t holds n × heads rows of head_dim values, w head_dim, as the kernel is told.
            unsafe { k.launch(grid(((n * heads) as u32, 1), BLOCK, 0)) }.map(drop).map_err(cuda_err)
        };
        let rope = |t: &mut CudaSlice<bf16>, heads: i32, l: usize| -> Result<()> {
            let (cos, sin) = match &self.local_rope {
                Some((c, s)) if cfg.local_rope(l) => (c, s),
                _ => (&self.cos, &self.sin),
            };
            let mut b = s.launch_builder(gpu.kernel("rope_bf16")?);
            b.arg(t).arg(cos).arg(sin).arg(&positions).arg(&heads).arg(&hd_i);
            // SAFETY: the buffers passed were sized above for the rows and widths given.
            unsafe { b.launch(grid((n as u32, heads as u32), (hd as u32 / 2).clamp(32, 1024), 0)) }
                .map(drop)
                .map_err(cuda_err)
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let lora = |p: Proj,
                        input: &CudaSlice<bf16>,
                        y: &mut CudaSlice<bf16>,
                        tmp: &mut CudaSlice<f32>,
                        sums: &mut ShareSums| match adapters {
                Some(a) => a.apply(gpu, &lora_rows, l * 7 + p as usize, input, y, tmp, sums, p.shape(cfg)),
                None => Ok(()),
            };
            rms(&x, &layer.input_norm, &mut hn, n)?;
            linear(gpu, &hn, &layer.proj[Proj::Q as usize], &mut q, n, Proj::Q.shape(cfg))?;
            linear(gpu, &hn, &layer.proj[Proj::K as usize], &mut k, n, Proj::K.shape(cfg))?;
            linear(gpu, &hn, &layer.proj[Proj::V as usize], &mut v, n, Proj::V.shape(cfg))?;
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                bias(&mut q, bq, nh * hd)?;
                bias(&mut k, bk, nkv * hd)?;
                bias(&mut v, bv, nkv * hd)?;
            }
            if l == 0
                && let Some(a) = adapters
            {
                // The first read of the adapter pool: wait for this step's adapters' uploads
                // (and no others), which ran on the copy stream meanwhile.
                a.wait_for_uploads(gpu, seqs.iter().filter_map(|s| s.adapter))?;
            }
            lora(Proj::Q, &hn, &mut q, &mut lora_tmp, &mut sums)?;
            lora(Proj::K, &hn, &mut k, &mut lora_tmp, &mut sums)?;
            lora(Proj::V, &hn, &mut v, &mut lora_tmp, &mut sums)?;
            if let Some([nq, nk]) = &layer.qk_norm {
                head_norm(&mut q, nq, nh)?;
                head_norm(&mut k, nk, nkv)?;
            }
            rope(&mut q, nh_i, l)?;
            rope(&mut k, nkv_i, l)?;
            {
                let te = (nkv * hd) as i32;
                let mut b = s.launch_builder(gpu.kernel("write_kv_bf16")?);
                b.arg(&k).arg(&v).arg(&mut kv.k[l]).arg(&mut kv.v[l]).arg(&banks).arg(&te);
                // SAFETY: the buffers passed were sized above for the rows and widths given.
                unsafe { b.launch(grid((n as u32, 1), BLOCK, 0)) }.map_err(cuda_err)?;
            }
            {
                let mb = plan.max_blocks as i32;
                let window = cfg.layer_windows.get(l).copied().flatten().unwrap_or(0).min(i32::MAX as usize) as i32;
                if plan.decode {
                    let mut b = s.launch_builder(gpu.kernel("paged_attention_decode_bf16")?);
                    b.arg(&mut attn).arg(&q).arg(&kv.k[l]).arg(&kv.v[l]).arg(&tables).arg(&context_lens);
                    b.arg(&mb).arg(&nh_i).arg(&nkv_i).arg(&hd_i).arg(&bs_i).arg(&scale).arg(&window);
                    // SAFETY: the buffers passed were sized above for the rows and widths given.
                    unsafe { b.launch(attention_grid(nh, plan.seqs)) }.map_err(cuda_err)?;
                } else {
                    let mut b = s.launch_builder(gpu.kernel("paged_attention_prefill_bf16")?);
                    b.arg(&mut attn).arg(&q).arg(&kv.k[l]).arg(&kv.v[l]).arg(&tables).arg(&row_seq);
                    b.arg(&positions).arg(&mb).arg(&nh_i).arg(&nkv_i).arg(&hd_i).arg(&bs_i).arg(&scale).arg(&window);
                    // SAFETY: the buffers passed were sized above for the rows and widths given.
                    unsafe { b.launch(attention_grid(nh, n)) }.map_err(cuda_err)?;
                }
            }
            linear(gpu, &attn, &layer.proj[Proj::O as usize], &mut out, n, Proj::O.shape(cfg))?;
            lora(Proj::O, &attn, &mut out, &mut lora_tmp, &mut sums)?;
            match &layer.ffn_norms {
                // Gemma: the attention output normed, added, then the pre-MLP norm.
                Some([pre, _]) => {
                    rms(&out, &layer.post_norm, &mut hn, n)?;
                    add(&mut x, &hn, n * h)?;
                    rms(&x, pre, &mut hn, n)?;
                }
                None => {
                    add(&mut x, &out, n * h)?;
                    rms(&x, &layer.post_norm, &mut hn, n)?;
                }
            }
            linear(gpu, &hn, &layer.proj[Proj::Gate as usize], &mut gate, n, Proj::Gate.shape(cfg))?;
            linear(gpu, &hn, &layer.proj[Proj::Up as usize], &mut up, n, Proj::Up.shape(cfg))?;
            lora(Proj::Gate, &hn, &mut gate, &mut lora_tmp, &mut sums)?;
            lora(Proj::Up, &hn, &mut up, &mut lora_tmp, &mut sums)?;
            {
                let len = (n * inter) as i32;
                let activation = match cfg.family.activation().1 {
                    crate::shape::family::Activation::Silu => "silu_mul_bf16",
                    crate::shape::family::Activation::GeluTanh => "gelu_tanh_mul_bf16",
                };
                let mut b = s.launch_builder(gpu.kernel(activation)?);
                b.arg(&gate).arg(&up).arg(&mut act).arg(&len);
                // SAFETY: the buffers passed were sized above for the rows and widths given.
                unsafe { b.launch(grid(((n * inter).div_ceil(BLOCK as usize) as u32, 1), BLOCK, 0)) }
                    .map_err(cuda_err)?;
            }
            linear(gpu, &act, &layer.proj[Proj::Down as usize], &mut out, n, Proj::Down.shape(cfg))?;
            lora(Proj::Down, &act, &mut out, &mut lora_tmp, &mut sums)?;
            match &layer.ffn_norms {
                Some([_, post]) => {
                    rms(&out, post, &mut hn, n)?;
                    add(&mut x, &hn, n * h)?;
                }
                None => add(&mut x, &out, n * h)?,
            }
        }
        // The rows whose logits are wanted, normed, through the head.
        let m = plan.n_out;
        let vocab = cfg.vocab_size;
        let mut picked = bufs.picked.take(gpu, m * h, grown)?;
        let mut normed = bufs.normed.take(gpu, m * h, grown)?;
        let mut logits = bufs.logits16.take(gpu, m * vocab, grown)?;
        let mut out32 = bufs.logits.take(gpu, m * vocab, grown)?;
        {
            let mut b = s.launch_builder(gpu.kernel("embedding_bf16")?);
            let out_rows = plan.part(Part::OutRows);
            b.arg(&x).arg(&out_rows).arg(&mut picked).arg(&h_i);
            // SAFETY: the buffers passed were sized above for the rows and widths given.
            unsafe { b.launch(grid((m as u32, 1), BLOCK, 0)) }.map_err(cuda_err)?;
        }
        rms(&picked, &self.norm, &mut normed, m)?;
        linear(gpu, &normed, self.lm_head.as_ref().unwrap_or(&self.embed), &mut logits, m, (vocab, h))?;
        {
            let len = (m * vocab) as i32;
            let mut b = s.launch_builder(gpu.kernel("bf16_to_f32_kernel")?);
            b.arg(&logits).arg(&mut out32).arg(&len);
            // SAFETY: the buffers passed were sized above for the rows and widths given.
            unsafe { b.launch(grid(((m * vocab).div_ceil(BLOCK as usize) as u32, 1), BLOCK, 0)) }.map_err(cuda_err)?;
            if let Some(cap) = cfg.final_logit_softcapping {
                let mut b = s.launch_builder(gpu.kernel("softcap_f32")?);
                b.arg(&mut out32).arg(&cap).arg(&len);
                // SAFETY: out32 holds the m × vocab logits, as the kernel is told.
                unsafe { b.launch(grid(((m * vocab).div_ceil(BLOCK as usize) as u32, 1), BLOCK, 0)) }
                    .map_err(cuda_err)?;
            }
        }
        let shares = match adapters {
            Some(_) => sums.download(gpu)?,
            None => vec![AdapterShare::default(); plan.seqs],
        };
        bufs.sums.put(sums_buf);
        bufs.plan.put(plan.buf);
        for (bank, b) in [
            (&mut bufs.x, x),
            (&mut bufs.hn, hn),
            (&mut bufs.q, q),
            (&mut bufs.k, k),
            (&mut bufs.v, v),
            (&mut bufs.attn, attn),
            (&mut bufs.out, out),
            (&mut bufs.gate, gate),
            (&mut bufs.up, up),
            (&mut bufs.act, act),
            (&mut bufs.picked, picked),
            (&mut bufs.normed, normed),
            (&mut bufs.logits16, logits),
        ] {
            bank.put(b);
        }
        bufs.lora_tmp.put(lora_tmp);
        bufs.logits.put(out32);
        Ok(Step { bufs: guard, rows: m, vocab, shares })
    }
}

fn plan_lora(p: &StepPlan, max_rank: usize) -> LoraRows<'_> {
    LoraRows {
        decode: p.decode,
        max_rank,
        rows: p.rows,
        seqs: p.seqs,
        seg_start: p.part(Part::SegStart),
        seg_len: p.part(Part::SegLen),
        seg_adapter: p.part(Part::SegAdapter),
        row_adapter: p.part(Part::RowAdapter),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        let text = r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 100, "max_position_embeddings": 64}"#;
        // One folder per call: tests run in parallel threads of one process.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("openlora-plan-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("config.json"), text).expect("config");
        ModelConfig::from_file(&dir.join("config.json")).expect("config")
    }

    #[test]
    fn a_step_is_laid_out_row_by_row_with_banks_tables_and_adapters() {
        let cfg = cfg();
        // A prefill of 3 tokens at 0 (block 7), and a decode at position 17: the fifth block (4), bank 4·4+1.
        let seqs = [
            GpuSeq { tokens: &[11, 12, 13], start: 0, blocks: &[7], adapter: Some(3) },
            GpuSeq { tokens: &[14], start: 17, blocks: &[2, 5, 9, 1, 4], adapter: None },
        ];
        let p = StepPlan::layout(&cfg, 4, &seqs, false).expect("layout");
        assert_eq!((p.rows, p.seqs, p.decode, p.any_adapter, p.max_blocks, p.max_context), (4, 2, false, true, 5, 18));
        assert_eq!(p.host_part(Part::Ids), [11, 12, 13, 14]);
        assert_eq!(p.host_part(Part::Positions), [0, 1, 2, 17]);
        assert_eq!(p.host_part(Part::Banks), [28, 29, 30, 17]);
        assert_eq!(p.host_part(Part::RowSeq), [0, 0, 0, 1]);
        assert_eq!(p.host_part(Part::Tables), [7, 0, 0, 0, 0, 2, 5, 9, 1, 4]);
        assert_eq!(p.host_part(Part::ContextLens), [3, 18]);
        assert_eq!(p.host_part(Part::SegStart), [0, 3]);
        assert_eq!(p.host_part(Part::SegLen), [3, 1]);
        assert_eq!(p.host_part(Part::SegAdapter), [3, u32::MAX], "no adapter is -1 as i32");
        assert_eq!(p.host_part(Part::RowAdapter), [3, 3, 3, u32::MAX]);
        assert_eq!(p.host_part(Part::OutRows), [2, 3], "each sequence's last row");
        let all = StepPlan::layout(&cfg, 4, &seqs, true).expect("layout");
        assert_eq!(all.host_part(Part::OutRows), [0, 1, 2, 3]);
        let decode = StepPlan::layout(&cfg, 4, &seqs[1..], false).expect("layout");
        assert!(decode.decode && !decode.any_adapter);
    }

    #[test]
    fn a_step_that_does_not_fit_is_refused_before_anything_is_uploaded() {
        let cfg = cfg();
        let beyond_blocks = [GpuSeq { tokens: &[1, 2], start: 3, blocks: &[0], adapter: None }];
        assert!(StepPlan::layout(&cfg, 4, &beyond_blocks, false).is_err());
        let bad_token = [GpuSeq { tokens: &[100], start: 0, blocks: &[0], adapter: None }];
        assert!(StepPlan::layout(&cfg, 4, &bad_token, false).is_err());
        let empty = [GpuSeq { tokens: &[], start: 0, blocks: &[0], adapter: None }];
        assert!(StepPlan::layout(&cfg, 4, &empty, false).is_err());
    }
}
