//! The Llama-family decoder: weights and a batched forward pass over many sequences.
//!
//! A forward call takes a flat batch — every sequence's new tokens laid end to end — so
//! prefill and decode rows of different sequences share each projection's matmul; only
//! attention runs per sequence, over that sequence's own key/value cache.

use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};

use openlora_kernels::attention::SeqAttention;
use openlora_kernels::gemm::Weight;
use openlora_kernels::lora::PagePool;

use super::dense::{self, ServeDType};
use super::kv::{AllocStatus, BlockPool, KvDType, PagedKvCache, SeqKv};
use super::lora::{AdapterShare, LoraPlan, PlacedAdapter};
use super::ops;
use super::rope::RopeTables;
use super::weights::WeightFiles;
use crate::error::{Error, LoadError, Result, SubmitError};
use crate::shape::{LayerExtras, ModelConfig, Proj};

struct Layer {
    /// Projection weights `[out, in]` in their kept dtype, indexed by `Proj as usize`.
    proj: [Weight; 7],
    input_norm: Tensor,
    post_attention_norm: Tensor,
    /// The q, k and v biases, in families that have them (Qwen2).
    qkv_bias: Option<[Vec<f32>; 3]>,
    /// The per-head RMSNorm weights of q and k `[head_dim]`, in families that have them (Qwen3,
    /// Gemma 3).
    qk_norm: Option<[Tensor; 2]>,
    /// The norms before and after the MLP, in families with norms on both sides (Gemma 3; the
    /// post-attention norm is then the attention output's).
    ffn_norms: Option<[Tensor; 2]>,
}

/// One sequence's slice of a flat batch.
pub struct SeqBatch<'a> {
    /// The new tokens to run for this sequence.
    pub tokens: &'a [u32],
    /// The sequence's KV blocks; its length is the position of `tokens[0]`.
    pub kv: &'a mut SeqKv,
    /// The LoRA adapter this sequence runs with, resident in the pool passed to `forward`.
    pub adapter: Option<&'a dyn PlacedAdapter>,
}

impl<'a> SeqBatch<'a> {
    /// A sequence of the base model (no adapter).
    pub fn base(tokens: &'a [u32], kv: &'a mut SeqKv) -> Self {
        SeqBatch { tokens, kv, adapter: None }
    }
}

/// Gives every sequence of a step the KV blocks it lacks for its new tokens (the scheduler has
/// reserved them already; a direct caller may not have), or says which sequence cannot have them.
pub fn reserve_batch(kv: &mut BlockPool, batch: &mut [SeqBatch<'_>]) -> Result<()> {
    for seq in batch.iter_mut() {
        match kv.reserve(seq.kv, seq.tokens.len()) {
            AllocStatus::Ok => {}
            status => {
                return Err(Error::from(SubmitError::KvExhausted {
                    needed_tokens: seq.kv.len() + seq.tokens.len(),
                    ever: status == AllocStatus::Later,
                }));
            }
        }
    }
    Ok(())
}

/// Which rows of the batch to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// Every token of every sequence (used to check parity).
    All,
    /// Only each sequence's last token (generation).
    Last,
}

/// A loaded Llama-family decoder: dense weights kept in the dtype served in (see
/// [`ServeDType`]), everything else computing in f32.
pub struct Llama {
    cfg: ModelConfig,
    /// The embedding table `[vocab, hidden]`; the same weight as `lm_head` when tied.
    embed: Arc<Weight>,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Arc<Weight>,
    /// The dtype the dense weights were loaded for.
    dtype: ServeDType,
    rope: RopeTables,
    /// The sliding layers' RoPE tables, where their base differs (Gemma 3).
    rope_local: Option<RopeTables>,
    device: Device,
}

impl Llama {
    /// Loads every weight the config implies, checking names and shapes, each dense weight
    /// kept as stored.
    pub fn load(cfg: &ModelConfig, weights: &WeightFiles, device: &Device) -> Result<Self> {
        Self::load_as(cfg, weights, device, ServeDType::Auto)
    }

    /// [`Llama::load`], the dense weights kept in the dtype `dtype` chooses.
    pub fn load_as(cfg: &ModelConfig, weights: &WeightFiles, device: &Device, dtype: ServeDType) -> Result<Self> {
        let dt = DType::F32;
        let h = cfg.hidden_size;
        // A norm's weight as the family applies it: w, or (1 + w) for Gemma.
        let norm = |name: &str, len: usize| -> Result<Tensor> {
            let w = weights.load(name, &[len], dt, device)?;
            Ok(if cfg.family.norm_plus_one() { (w + 1.0)? } else { w })
        };
        let embed = Arc::new(dense::load_weight(weights, "model.embed_tokens.weight", cfg.vocab_size, h, dtype)?);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let load_proj = |p: Proj| {
                let (o, i) = p.shape(cfg);
                dense::load_weight(weights, &p.tensor_name(l), o, i, dtype)
            };
            let proj = [
                load_proj(Proj::Q)?,
                load_proj(Proj::K)?,
                load_proj(Proj::V)?,
                load_proj(Proj::O)?,
                load_proj(Proj::Gate)?,
                load_proj(Proj::Up)?,
                load_proj(Proj::Down)?,
            ];
            let extras = cfg.layer_extras(l);
            let bias = |name: &str, len: usize| -> Result<Vec<f32>> {
                Ok(weights.load(name, &[len], dt, device)?.to_vec1::<f32>()?)
            };
            let qkv_bias = LayerExtras::load(&extras.qkv_bias, bias)?;
            let qk_norm = LayerExtras::load(&extras.qk_norm, |name, len| norm(name, len))?;
            let ffn_norms = LayerExtras::load(&extras.ffn_norms, |name, len| norm(name, len))?;
            let at = |name: &str| format!("model.layers.{l}.{name}");
            layers.push(Layer {
                proj,
                input_norm: norm(&at("input_layernorm.weight"), h)?,
                post_attention_norm: norm(&at("post_attention_layernorm.weight"), h)?,
                qkv_bias,
                qk_norm,
                ffn_norms,
            });
        }
        let norm = norm("model.norm.weight", h)?;
        let lm_head = if cfg.tie_word_embeddings && !weights.contains("lm_head.weight") {
            embed.clone()
        } else {
            Arc::new(dense::load_weight(weights, "lm_head.weight", cfg.vocab_size, h, dtype)?)
        };
        Ok(Llama {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            dtype,
            rope: RopeTables::new(cfg),
            rope_local: local_rope(cfg),
            device: device.clone(),
        })
    }

    /// A model of `cfg`'s shape (a family with no weights beyond Llama's: Llama, Mistral) from
    /// f32 weights already on `device`: the embedding
    /// `[vocab, hidden]`; per layer its seven projections `[out, in]` in [`Proj::ALL`] order, its
    /// input norm and its post-attention norm `[hidden]`; the final norm; and the head
    /// `[vocab, hidden]` (the embedding again when tied). Every shape is checked against `cfg`.
    pub fn from_parts(
        cfg: &ModelConfig,
        embed: Tensor,
        layers: Vec<([Tensor; 7], Tensor, Tensor)>,
        norm: Tensor,
        lm_head: Tensor,
        device: &Device,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        if cfg.family.qkv_bias() || cfg.family.qk_norm() || cfg.family.sandwich_norms() {
            return Err(Error::config("(in memory)", "model_type", "built from parts: Llama or Mistral shapes only"));
        }
        let check = |name: String, t: &Tensor, expected: &[usize]| {
            if t.dims() == expected {
                Ok(())
            } else {
                let file = std::path::PathBuf::from("(in memory)");
                Err(Error::from(LoadError::TensorShape {
                    file,
                    tensor: name,
                    expected: expected.to_vec(),
                    got: t.dims().to_vec(),
                }))
            }
        };
        if layers.len() != cfg.num_layers {
            let got = vec![layers.len()];
            let file = std::path::PathBuf::from("(in memory)");
            return Err(Error::from(LoadError::TensorShape {
                file,
                tensor: "model.layers".into(),
                expected: vec![cfg.num_layers],
                got,
            }));
        }
        check("model.embed_tokens.weight".into(), &embed, &[cfg.vocab_size, h])?;
        check("model.norm.weight".into(), &norm, &[h])?;
        check("lm_head.weight".into(), &lm_head, &[cfg.vocab_size, h])?;
        let mut built = Vec::with_capacity(layers.len());
        let dtype = ServeDType::Auto;
        for (l, (proj, input_norm, post_attention_norm)) in layers.into_iter().enumerate() {
            for (&p, w) in Proj::ALL.iter().zip(&proj) {
                let (o, i) = p.shape(cfg);
                check(p.tensor_name(l), w, &[o, i])?;
            }
            check(format!("model.layers.{l}.input_layernorm.weight"), &input_norm, &[h])?;
            check(format!("model.layers.{l}.post_attention_layernorm.weight"), &post_attention_norm, &[h])?;
            let [q, k, v, o, gate, up, down] = proj;
            let proj = [
                dense::weight_from_tensor(&q, dtype)?,
                dense::weight_from_tensor(&k, dtype)?,
                dense::weight_from_tensor(&v, dtype)?,
                dense::weight_from_tensor(&o, dtype)?,
                dense::weight_from_tensor(&gate, dtype)?,
                dense::weight_from_tensor(&up, dtype)?,
                dense::weight_from_tensor(&down, dtype)?,
            ];
            built.push(Layer { proj, input_norm, post_attention_norm, qkv_bias: None, qk_norm: None, ffn_norms: None });
        }
        let tied = embed.id() == lm_head.id();
        let embed = Arc::new(dense::weight_from_tensor(&embed, dtype)?);
        let lm_head = if tied { embed.clone() } else { Arc::new(dense::weight_from_tensor(&lm_head, dtype)?) };
        Ok(Llama {
            cfg: cfg.clone(),
            embed,
            layers: built,
            norm,
            lm_head,
            dtype,
            rope: RopeTables::new(cfg),
            rope_local: local_rope(cfg),
            device: device.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// A KV pool (f32) holding `seqs` sequences of up to the model's full context.
    pub fn kv_cache_for(&self, seqs: usize) -> PagedKvCache {
        PagedKvCache::for_sequences(&self.cfg, seqs, self.cfg.max_position_embeddings, KvDType::F32)
    }

    /// The dtype the dense weights are kept in.
    pub fn dtype(&self) -> ServeDType {
        self.dtype
    }

    /// Projection `p` of layer `l` for the rows of `x`: the base weight, the bias where the
    /// family has one, then each sequence's adapter delta, and last the `residual` stream where
    /// it is added straight after (one pass fewer than adding the tensors), all on the one
    /// output buffer.
    fn project(&self, l: usize, p: Proj, x: &Tensor, lora: &LoraPlan<'_>, residual: Option<&Tensor>) -> Result<Tensor> {
        let layer = &self.layers[l];
        let w = &layer.proj[p as usize];
        let bias = layer
            .qkv_bias
            .as_ref()
            .and_then(|b| [Proj::Q, Proj::K, Proj::V].iter().position(|&q| q == p).map(|i| &b[i]));
        dense::project(x, w, |xs, ys| {
            if let Some(bias) = bias {
                for row in ys.chunks_exact_mut(bias.len()) {
                    row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
                }
            }
            lora.apply(l, p, xs, ys, w.cols(), w.rows());
            match residual {
                Some(r) => dense::with_rows(r, |rs| ops::add_assign(ys, rs))?,
                None => Ok(()),
            }
        })
    }

    /// Runs one step for a batch of sequences, writing their new keys and values into `kv`
    /// (reserving blocks for any sequence that lacks them), and returns logits `[rows, vocab]`
    /// for the rows `rows` selects. Sequences with an adapter read its weights from `pool`,
    /// the active adapter pool they are resident in.
    pub fn forward(
        &self,
        kv: &mut PagedKvCache,
        batch: &mut [SeqBatch<'_>],
        rows: LogitRows,
        pool: Option<PagePool<'_>>,
    ) -> Result<Tensor> {
        Ok(self.forward_measured(kv, batch, rows, pool)?.0)
    }

    /// [`Llama::forward`], also returning each sequence's measured adapter share of its
    /// adapted projections' output in this step (the attribution input).
    pub fn forward_measured(
        &self,
        kv: &mut PagedKvCache,
        batch: &mut [SeqBatch<'_>],
        rows: LogitRows,
        pool: Option<PagePool<'_>>,
    ) -> Result<(Tensor, Vec<AdapterShare>)> {
        // The whole step on one of the compute threads, so that each of its parallel loops (a
        // hundred a step) starts there at once, instead of this thread handing each one to a
        // pool and sleeping until it is done.
        openlora_kernels::compute::run(|| self.step(kv, batch, rows, pool))
    }

    /// [`Llama::forward_measured`]'s work, on whichever thread calls it.
    fn step(
        &self,
        kv: &mut PagedKvCache,
        batch: &mut [SeqBatch<'_>],
        rows: LogitRows,
        pool: Option<PagePool<'_>>,
    ) -> Result<(Tensor, Vec<AdapterShare>)> {
        let cfg = &self.cfg;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for seq in batch.iter() {
            let start = seq.kv.len();
            // The engine runs only validated requests (`crate::request`); direct callers
            // (tests, benchmarks) must keep to the same rules.
            debug_assert!(!seq.tokens.is_empty(), "a sequence in the batch has no new tokens");
            debug_assert!(start + seq.tokens.len() <= cfg.max_position_embeddings, "past the context");
            debug_assert!(seq.tokens.iter().all(|&t| (t as usize) < cfg.vocab_size), "token outside the vocabulary");
            spans.push((ids.len(), seq.tokens.len(), start));
            ids.extend_from_slice(seq.tokens);
            positions.extend((start..start + seq.tokens.len()).map(|p| p as u32));
        }
        debug_assert!(pool.is_some() || batch.iter().all(|s| s.adapter.is_none()), "an adapter but no pool");
        reserve_batch(kv.blocks_mut(), batch)?;
        let lora =
            LoraPlan::new(pool, batch.iter().zip(&spans).map(|(s, &(off, len, _))| (off, len, s.adapter)).collect());
        let attn_seqs: Vec<SeqAttention<'_>> = batch
            .iter()
            .zip(&spans)
            .map(|(s, &(off, len, start))| SeqAttention {
                row: off,
                new_tokens: len,
                context: start + len,
                blocks: s.kv.blocks(),
            })
            .collect();
        let scale = cfg.attention_scale();
        let n = ids.len();
        let mut x = dense::gather_rows(&self.embed, &ids, &self.device)?;
        if cfg.family.scaled_embeddings() {
            x = (x * (cfg.hidden_size as f64).sqrt())?;
        }
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        for (l, layer) in self.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &layer.input_norm, cfg.rms_norm_eps)?;
            let mut q = self.project(l, Proj::Q, &h, &lora, None)?.reshape((n, nh, hd))?;
            let mut k = self.project(l, Proj::K, &h, &lora, None)?.reshape((n, nkv, hd))?;
            let v = self.project(l, Proj::V, &h, &lora, None)?.reshape((n, nkv, hd))?;
            if let Some([qn, kn]) = &layer.qk_norm {
                q = ops::rms_norm(&q, qn, cfg.rms_norm_eps)?;
                k = ops::rms_norm(&k, kn, cfg.rms_norm_eps)?;
            }
            let rope = match &self.rope_local {
                Some(local) if cfg.local_rope(l) => local,
                _ => &self.rope,
            };
            let q = rope.apply(&q, &positions)?;
            let k = rope.apply(&k, &positions)?;
            // The new keys and values into the cache and the queries into attention, read where
            // the tensors hold them.
            let mut attn = vec![0f32; n * nh * hd];
            let window = cfg.layer_windows.get(l).copied().flatten();
            dense::with_rows(&k, |ks| {
                dense::with_rows(&v, |vs| {
                    dense::with_rows(&q, |qs| {
                        kv.write_and_attend(l, (ks, vs, qs), &mut attn, &attn_seqs, scale, window)
                    })
                })
            })???;
            let attn = Tensor::from_vec(attn, (n, nh * hd), &self.device)?;
            let eps = cfg.rms_norm_eps;
            let h = match &layer.ffn_norms {
                // Gemma: the attention output normed, added, then the pre-MLP norm.
                Some([pre, _]) => {
                    let out = self.project(l, Proj::O, &attn, &lora, None)?;
                    x = ops::add(&x, &ops::rms_norm(&out, &layer.post_attention_norm, eps)?)?;
                    ops::rms_norm(&x, pre, eps)?
                }
                None => {
                    x = self.project(l, Proj::O, &attn, &lora, Some(&x))?;
                    ops::rms_norm(&x, &layer.post_attention_norm, eps)?
                }
            };
            let gate = self.project(l, Proj::Gate, &h, &lora, None)?;
            let up = self.project(l, Proj::Up, &h, &lora, None)?;
            let act = match cfg.family.activation().1 {
                crate::shape::family::Activation::Silu => ops::silu_mul(&gate, &up)?,
                crate::shape::family::Activation::GeluTanh => ops::gelu_tanh_mul(&gate, &up)?,
            };
            x = match &layer.ffn_norms {
                Some([_, post]) => {
                    let down = self.project(l, Proj::Down, &act, &lora, None)?;
                    ops::add(&x, &ops::rms_norm(&down, post, eps)?)?
                }
                None => self.project(l, Proj::Down, &act, &lora, Some(&x))?,
            };
        }
        drop(attn_seqs);
        for seq in batch.iter_mut() {
            BlockPool::commit(seq.kv, seq.tokens.len());
        }
        let x = match rows {
            LogitRows::All => x,
            LogitRows::Last => {
                let last: Vec<u32> = spans.iter().map(|&(off, len, _)| (off + len - 1) as u32).collect();
                let idx = Tensor::from_vec(last, spans.len(), &self.device)?;
                x.index_select(&idx, 0)?
            }
        };
        let x = ops::rms_norm(&x, &self.norm, cfg.rms_norm_eps)?;
        let mut logits = dense::project(&x, &self.lm_head, |_, _| Ok(()))?;
        if let Some(cap) = cfg.final_logit_softcapping {
            logits = ((logits / cap as f64)?.tanh()? * cap as f64)?;
        }
        debug_assert_eq!(logits.dim(D::Minus1)?, cfg.vocab_size);
        Ok((logits, lora.shares()))
    }
}

/// The sliding layers' own RoPE tables, where the family gives them another base (Gemma 3).
fn local_rope(cfg: &ModelConfig) -> Option<RopeTables> {
    (0..cfg.num_layers).find(|&l| cfg.local_rope(l)).map(|l| RopeTables::new(&cfg.rope_for_layer(l)))
}
