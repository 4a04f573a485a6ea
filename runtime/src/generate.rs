//! Generating text for one request: the decode loop with EOS, stop strings and max tokens.

use crate::error::{Error, Result};
use crate::model::{LoadedModel, LogitRows, PagedKvCache, SeqBatch, SeqKv, StreamDecoder};
use crate::pager::{AdapterLease, AdapterPager};
use crate::sampling::{Sampler, SamplingParams};

/// Why generation ended, in OpenAI's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the model's context was reached.
    Length,
    /// The caller cancelled or went away.
    Cancelled,
    /// The request's deadline passed.
    Deadline,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Deadline => "deadline",
        }
    }
}

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

/// Holds back streamed text that might be the start of a stop string, and cuts at one.
#[derive(Debug, Default)]
pub struct StopScanner {
    stop: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopScanner {
    /// A scanner for the given stop strings (none is fine).
    pub fn new(stop: Vec<String>) -> Self {
        StopScanner { stop, text: String::new(), emitted: 0 }
    }

    /// Adds newly decoded text; returns the text now safe to emit and whether a stop string
    /// was found (in which case generation must end and the stop string is dropped).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        let from = self.emitted;
        self.text.push_str(delta);
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let mut search = from.saturating_sub(longest);
        while !self.text.is_char_boundary(search) {
            search -= 1;
        }
        let hit = self.stop.iter().filter_map(|s| self.text[search..].find(s.as_str()).map(|i| search + i)).min();
        if let Some(at) = hit {
            let at = at.max(from);
            let out = self.text[from..at].to_string();
            self.text.truncate(at);
            self.emitted = at;
            return (out, true);
        }
        let mut hold = 0;
        for s in &self.stop {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && self.text.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let safe = (self.text.len() - hold).max(from);
        self.emitted = safe;
        (self.text[from..safe].to_string(), false)
    }

    /// Releases whatever was held back once generation has ended without a stop string.
    pub fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// All text accepted so far.
    pub fn text(&self) -> &str {
        &self.text
    }
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
    params.validate()?;
    let context = model.config().max_position_embeddings;
    if prompt_ids.is_empty() {
        return Err(Error::InvalidParam { param: "prompt", message: "the prompt has no tokens".into() });
    }
    if prompt_ids.len() >= context {
        return Err(Error::ContextOverflow { prompt_tokens: prompt_ids.len(), context });
    }
    let max_new = params.max_tokens.min(context - prompt_ids.len());
    let ignore_eos = params.ignore_eos;
    let mut scanner = StopScanner::new(params.stop.clone());
    let mut sampler = Sampler::new(params);
    let mut cache = PagedKvCache::for_sequences(model.config(), 1, prompt_ids.len() + max_new);
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
                let seq = SeqBatch { tokens: &step_tokens, kv: &mut kv, adapter: Some(a.lease.resident()) };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(stop: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut s = StopScanner::new(stop.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let (o, stopped) = s.push(p);
            out.push(o);
            if stopped {
                return (out, true, s.text().to_string());
            }
        }
        out.push(s.finish());
        (out, false, s.text().to_string())
    }

    #[test]
    fn stop_string_split_across_tokens_is_cut() {
        let (out, stopped, text) = stream(&["END"], &["hello E", "N", "D more"]);
        assert!(stopped);
        assert_eq!(text, "hello ");
        assert_eq!(out.concat(), "hello ");
        assert_eq!(out[0], "hello ", "the partial `E` is held back");
    }

    #[test]
    fn held_back_text_is_released_when_no_stop_follows() {
        let (out, stopped, text) = stream(&["END"], &["a E", "x", "yz"]);
        assert!(!stopped);
        assert_eq!(text, "a Exyz");
        assert_eq!(out.concat(), "a Exyz");
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_is_safe() {
        let (out, stopped, text) = stream(&["é!", "zz"], &["café", "!zz"]);
        assert!(stopped);
        assert_eq!(text, "caf");
        assert_eq!(out.concat(), "caf");
    }

    #[test]
    fn no_stop_strings_streams_everything() {
        let (out, stopped, _) = stream(&[], &["a", "b"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a", "b", ""]);
    }
}
