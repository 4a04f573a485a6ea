//! One request inside the engine: its tokens, KV blocks, adapter lease, sampler and usage.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::backend::{Pick, StepRow};
use super::{Event, GenerationRequest, Submission, TokenLogprob, Usage};
use super::{FinishReason, StopScanner};
use crate::model::lora::AdapterShare;
use crate::model::{LoadedModel, SeqKv, StreamDecoder};
use crate::pager::AdapterLease;
use crate::request::AdapterRef;
use crate::sampling::Sampler;

/// A request's state from arrival to finish.
pub(super) struct Sequence {
    pub request: GenerationRequest,
    /// The adapter version it was admitted with.
    pub adapter: Option<AdapterRef>,
    events: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    pub arrival: Instant,
    /// Order of arrival, for FCFS within a priority.
    pub arrival_seq: u64,
    /// Prompt and generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Blocks and the number of `tokens` whose keys and values are cached.
    pub kv: SeqKv,
    pub lease: Option<AdapterLease>,
    sampler: Sampler,
    decoder: StreamDecoder,
    scanner: StopScanner,
    pub usage: Usage,
    pub first_scheduled: Option<Instant>,
    compute_us: u64,
    adapter_us: u64,
    share: AdapterShare,
}

/// What happened when a token was added.
pub(super) enum Progress {
    Continue,
    Finished(FinishReason),
}

impl Sequence {
    pub fn new(sub: Submission, arrival_seq: u64) -> Self {
        let Submission { request, adapter, events, cancel, arrival } = sub;
        let prompt_len = request.prompt_ids.len();
        let usage = Usage { prompt_tokens: prompt_len as u32, ..Default::default() };
        Sequence {
            tokens: request.prompt_ids.clone(),
            sampler: Sampler::new(request.params.clone()),
            scanner: StopScanner::new(request.params.stop.clone()),
            decoder: StreamDecoder::starting_at(prompt_len),
            request,
            adapter,
            events,
            cancel,
            arrival,
            arrival_seq,
            prompt_len,
            kv: SeqKv::default(),
            lease: None,
            usage,
            first_scheduled: None,
            compute_us: 0,
            adapter_us: 0,
            share: AdapterShare::default(),
        }
    }

    /// Charges a step this sequence took part in with `tokens` of the step's `total`.
    pub fn add_step(&mut self, elapsed: Duration, tokens: usize, total: usize) {
        self.compute_us += elapsed.as_micros() as u64;
        self.usage.compute_ms = self.compute_us / 1000;
        self.usage.steps += 1;
        self.usage.batch_share_ppm += (tokens as u64 * 1_000_000) / total.max(1) as u64;
    }

    /// Adds a step's measured adapter share.
    pub fn add_share(&mut self, share: AdapterShare) {
        self.share.add(share);
        self.usage.adapter_contribution_ppm = self.share.ppm();
    }

    /// Charges time spent making its adapter resident.
    pub fn add_adapter_time(&mut self, elapsed: Duration) {
        self.adapter_us += elapsed.as_micros() as u64;
        self.usage.adapter_load_ms = self.adapter_us / 1000;
    }

    /// Whether the caller has gone away or cancelled.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }

    /// Tokens still to run through the model before the next token can be sampled.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.kv.len()
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// What a step must give back for this sequence's next token: only the most likely token's
    /// id when that is all it takes (greedy without penalties or log-probabilities).
    pub fn pick(&self) -> Pick {
        if self.request.logprobs.is_none() && self.sampler.params().is_plain_greedy() {
            Pick::Argmax
        } else {
            Pick::Logits
        }
    }

    /// Takes the next token from this sequence's step row (sampling its logits) and streams it.
    pub fn push_token(&mut self, model: &LoadedModel, row: StepRow) -> Progress {
        let (next, raw) = match row {
            StepRow::Token(t) => (t, None),
            StepRow::Logits(mut logits) => {
                // Log-probabilities are of the model's own distribution, before sampling adjustments.
                let raw = self.request.logprobs.map(|k| (logits.clone(), k));
                (self.sampler.sample(&mut logits, &self.tokens, self.prompt_len), raw)
            }
        };
        let params = self.sampler.params();
        if !params.ignore_eos && model.eos_token_ids.contains(&next) {
            return Progress::Finished(FinishReason::Stop);
        }
        self.tokens.push(next);
        self.usage.completion_tokens += 1;
        let logprob = raw.map(|(raw, k)| {
            let (lse, top) = logprobs_of(model, &raw, k);
            TokenLogprob { logprob: raw.get(next as usize).map_or(f32::NEG_INFINITY, |l| l - lse), top }
        });
        let delta = self.decoder.next(&model.tokenizer, &self.tokens).unwrap_or_default();
        let (mut text, stopped) = self.scanner.push(&delta);
        let done = if stopped {
            Some(FinishReason::Stop)
        } else if self.generated() >= self.sampler.params().max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        if done.is_some() {
            text.push_str(&self.scanner.finish());
        }
        let _ = self.events.send(Event::Token { id: next, text, logprob });
        match done {
            Some(r) => Progress::Finished(r),
            None => Progress::Continue,
        }
    }

    /// Sends the final event.
    pub fn finish(&mut self, reason: FinishReason) {
        if reason == FinishReason::Stop {
            // An EOS token: release text held back as a possible stop-string prefix.
            let rest = self.scanner.finish();
            if !rest.is_empty() {
                let _ = self.events.send(Event::Token { id: u32::MAX, text: rest, logprob: None });
            }
        }
        let _ = self.events.send(Event::Done { reason, usage: self.usage.clone() });
    }

    /// Sends a failure.
    pub fn fail(&self, message: String) {
        tracing::warn!(request = %self.request.id, error = %message, "the engine failed a request");
        let _ = self.events.send(Event::Failed { message, usage: self.usage.clone() });
    }
}

/// Log-sum-exp of the raw logits and the `k` most likely tokens with their log-probabilities.
fn logprobs_of(model: &LoadedModel, logits: &[f32], k: usize) -> (f32, Vec<(u32, String, f32)>) {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k > 0 {
        idx.select_nth_unstable_by(k - 1, |a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
    }
    idx.truncate(k);
    idx.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
    let top = idx
        .into_iter()
        .map(|t| (t, model.tokenizer.decode(&[t]).unwrap_or_default(), logits[t as usize] - lse))
        .collect();
    (lse, top)
}
