//! A reference decode loop for one sequence, with EOS, stop strings and max tokens: what the
//! engine's continuous batching must reproduce exactly (its tests compare against it).
//! `openlora generate` runs the engine itself.

use crate::engine::{FinishReason, StopScanner};
use crate::error::Result;
use crate::model::{KvDType, LoadedModel, LogitRows, PagedKvCache, SeqBatch, SeqKv, StreamDecoder};
use crate::pager::{AdapterLease, AdapterPager};
use crate::sampling::{Sampler, SamplingParams};

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Generated text, stop string excluded.
    pub text: String,
    /// Generated token ids (EOS excluded).
    pub token_ids: Vec<u32>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// A LoRA adapter to generate with: its lease (keeping it resident) and the pager holding it.
#[derive(Clone, Copy)]
pub struct WithAdapter<'a> {
    /// The pager whose pool holds the adapter.
    pub pager: &'a AdapterPager,
    /// The pin on the adapter.
    pub lease: &'a AdapterLease,
}

/// Generates a completion of `prompt_ids`, with `adapter` if given, calling `on_text` with
/// each piece of text as soon as it is final.
pub fn generate(
    model: &LoadedModel,
    prompt_ids: &[u32],
    params: SamplingParams,
    adapter: Option<WithAdapter<'_>>,
    on_text: &mut dyn FnMut(&str),
) -> Result<Completion> {
    // Inputs follow the engine's rules (`crate::request::Checker`); this loop does not check
    // them a second time.
    let context = model.config().max_position_embeddings;
    debug_assert!(params.validate().is_ok() && !prompt_ids.is_empty() && prompt_ids.len() < context);
    let max_new = params.max_tokens.min(context - prompt_ids.len());
    let ignore_eos = params.ignore_eos;
    let mut scanner = StopScanner::new(params.stop.clone());
    let mut sampler = Sampler::new(params);
    let mut cache = PagedKvCache::for_sequences(model.config(), 1, prompt_ids.len() + max_new, KvDType::F32);
    let mut kv = SeqKv::default();
    let mut ids = prompt_ids.to_vec();
    let mut decoder = StreamDecoder::starting_at(ids.len());
    let mut step_tokens = prompt_ids.to_vec();
    let mut finish = FinishReason::Length;
    for _ in 0..max_new {
        let logits = match adapter {
            None => model.llama()?.forward(
                &mut cache,
                &mut [SeqBatch::base(&step_tokens, &mut kv)],
                LogitRows::Last,
                None,
            )?,
            Some(a) => {
                let pool = a.pager.pool();
                let seq = SeqBatch { tokens: &step_tokens, kv: &mut kv, adapter: Some(a.lease.placed()) };
                model.llama()?.forward(&mut cache, &mut [seq], LogitRows::Last, Some(pool.view()))?
            }
        };
        let mut logits: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let next = sampler.sample(&mut logits, &ids, prompt_ids.len());
        if !ignore_eos && model.eos_token_ids.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        ids.push(next);
        let delta = decoder.next(&model.tokenizer, &ids)?;
        let (out, stopped) = scanner.push(&delta);
        if !out.is_empty() {
            on_text(&out);
        }
        if stopped {
            finish = FinishReason::Stop;
            break;
        }
        step_tokens = vec![next];
    }
    // Text held back as a possible stop-string prefix is final now (empty after a stop string).
    let rest = scanner.finish();
    if !rest.is_empty() {
        on_text(&rest);
    }
    Ok(Completion {
        text: scanner.text().to_string(),
        token_ids: ids[prompt_ids.len()..].to_vec(),
        prompt_tokens: prompt_ids.len(),
        finish_reason: finish,
    })
}
