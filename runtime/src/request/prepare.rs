//! The API's fields made into a checked engine request: sizes first (nothing large is
//! tokenised only to be refused), then the chat template and the tokenizer, the sampling
//! ranges, and the engine's rules.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use super::chat::{ChatMessage, ChatTemplate};
use super::checker::{Checked, Checker, GenerationRequest};
use crate::error::{Error, Result, SubmitError};
use crate::model::LoadedModel;
use crate::sampling::SamplingParams;

/// Most alternatives `logprobs` / `top_logprobs` may ask for.
const MAX_TOP_LOGPROBS: u32 = 20;

/// Most bytes of prompt text per token the prompt may have: text longer than this times the
/// token limit is refused before it is tokenised (no tokenizer packs more into one token).
const MAX_BYTES_PER_TOKEN: usize = 32;

/// Most metadata entries a request may carry (as OpenAI allows).
const MAX_METADATA: usize = 16;

/// `prompt`: a string, a list holding one string, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A batch of texts (only one is supported, as `n` = 1).
    Texts(Vec<String>),
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// The sampling and stopping fields both endpoints share, as the API names them.
#[derive(Debug, Default, Deserialize)]
pub struct ApiParams {
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<StopInput>,
    n: Option<u32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    ignore_eos: Option<bool>,
    metadata: Option<BTreeMap<String, String>>,
}

/// The limits the API holds requests to.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    /// Most prompt tokens.
    pub max_prompt_tokens: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
}

/// A checked request, before routing: what routing and settlement need.
#[derive(Debug)]
pub struct Prepared {
    /// The request (no adapter yet, normal priority).
    pub checked: Checked,
    /// The adapter the client asked for (`None`: the base model).
    pub requested_adapter: Option<String>,
    /// The request's checked `metadata`.
    pub metadata: Vec<(String, String)>,
    /// `max_tokens` as the client asked (or the default), before the context cut it: what
    /// plugins are told.
    pub max_tokens: usize,
}

/// Checks the API's requests: owns the limits, the tokenizer, the chat template, the model's
/// name and the engine's rules.
pub struct Validator {
    model: Arc<LoadedModel>,
    model_name: String,
    chat: ChatTemplate,
    limits: RequestLimits,
    checker: Checker,
}

fn field(param: &str, message: impl Into<String>) -> Error {
    SubmitError::InvalidField { param: Some(param.to_string()), message: message.into() }.into()
}

fn too_long(size: usize, limit: usize, unit: &'static str) -> Result<()> {
    if size > limit { Err(SubmitError::PromptTooLong { size, limit, unit }.into()) } else { Ok(()) }
}

impl Validator {
    /// A validator for `model`, served as `model_name`, with the engine's `checker`.
    pub fn new(model: Arc<LoadedModel>, model_name: String, limits: RequestLimits, checker: Checker) -> Result<Self> {
        let tok = &model.tokenizer;
        let chat = ChatTemplate::new(tok.chat_template.as_deref(), tok.bos_token.as_deref(), tok.eos_token.as_deref())?;
        Ok(Validator { model, model_name, chat, limits, checker })
    }

    /// The engine's rules.
    pub fn checker(&self) -> &Checker {
        &self.checker
    }

    /// The adapter `model` names (`None`: the base model).
    fn requested(&self, model: &str) -> Option<String> {
        (model != self.model_name).then(|| model.to_string())
    }

    /// A `/v1/completions` request. Blocking (it tokenises): call it off the async threads.
    pub fn completion(
        &self,
        id: String,
        model: &str,
        prompt: &PromptInput,
        logprobs: Option<u32>,
        params: ApiParams,
    ) -> Result<Prepared> {
        let sampling = self.sampling(&params)?;
        let logprobs = check_logprobs("logprobs", logprobs)?;
        let max_bytes = self.limits.max_prompt_tokens.saturating_mul(MAX_BYTES_PER_TOKEN);
        let prompt_ids = match prompt {
            PromptInput::Text(t) => {
                too_long(t.len(), max_bytes, "bytes")?;
                self.model.tokenizer.encode(t)?
            }
            PromptInput::Texts(v) if v.len() == 1 => {
                too_long(v[0].len(), max_bytes, "bytes")?;
                self.model.tokenizer.encode(&v[0])?
            }
            PromptInput::Texts(_) => return Err(field("prompt", "exactly one prompt is supported")),
            PromptInput::Tokens(ids) => ids.clone(),
        };
        self.finish(id, model, prompt_ids, logprobs, params, sampling)
    }

    /// A `/v1/chat/completions` request. Blocking (it renders and tokenises).
    pub fn chat(
        &self,
        id: String,
        model: &str,
        messages: &[ChatMessage],
        (logprobs, top_logprobs): (Option<bool>, Option<u32>),
        params: ApiParams,
    ) -> Result<Prepared> {
        let sampling = self.sampling(&params)?;
        if messages.is_empty() {
            return Err(field("messages", "at least one message is required"));
        }
        let want = logprobs.unwrap_or(false);
        let top = check_logprobs("top_logprobs", top_logprobs)?;
        if top.is_some() && !want {
            return Err(field("top_logprobs", "top_logprobs needs logprobs: true"));
        }
        too_long(messages.len(), self.limits.max_prompt_tokens, "messages")?;
        let messages = messages.iter().enumerate().map(|(i, m)| m.to_template(i)).collect::<Result<Vec<_>>>()?;
        let bytes: usize = messages.iter().map(|m| m.content.len() + m.role.len()).sum();
        too_long(bytes, self.limits.max_prompt_tokens.saturating_mul(MAX_BYTES_PER_TOKEN), "bytes")?;
        let text = self.chat.render(&messages)?;
        // The template writes the special tokens itself.
        let prompt_ids = self.model.tokenizer.encode_with(&text, false)?;
        self.finish(id, model, prompt_ids, want.then(|| top.unwrap_or(0)), params, sampling)
    }

    fn finish(
        &self,
        id: String,
        model: &str,
        prompt_ids: Vec<u32>,
        logprobs: Option<usize>,
        mut api: ApiParams,
        params: SamplingParams,
    ) -> Result<Prepared> {
        too_long(prompt_ids.len(), self.limits.max_prompt_tokens, "tokens")?;
        let metadata = check_metadata(api.metadata.take())?;
        let max_tokens = params.max_tokens;
        let request =
            GenerationRequest { id, prompt_ids, params, adapter: None, priority: 0, deadline: None, logprobs };
        Ok(Prepared {
            checked: self.checker.prompt_rules(request)?,
            requested_adapter: self.requested(model),
            metadata,
            max_tokens,
        })
    }

    fn sampling(&self, c: &ApiParams) -> Result<SamplingParams> {
        if let Some(n) = c.n
            && n != 1
        {
            return Err(field("n", "only n = 1 is supported"));
        }
        let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
            Some(0) => return Err(field("max_tokens", "max_tokens must be at least 1")),
            Some(m) => m as usize,
            None => self.limits.default_max_tokens,
        };
        let top_k = match c.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => return Err(field("top_k", format!("{k} is not a valid top_k"))),
        };
        let seed = match c.seed {
            None => None,
            Some(s) if s >= 0 => Some(s as u64),
            Some(s) => return Err(field("seed", format!("{s} is negative"))),
        };
        let stop = match &c.stop {
            None => Vec::new(),
            Some(StopInput::One(s)) => vec![s.clone()],
            Some(StopInput::Many(v)) => v.clone(),
        };
        let p = SamplingParams {
            temperature: c.temperature.unwrap_or(1.0),
            top_p: c.top_p.unwrap_or(1.0),
            top_k,
            seed,
            repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
            presence_penalty: c.presence_penalty.unwrap_or(0.0),
            frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
            max_tokens,
            stop,
            ignore_eos: c.ignore_eos.unwrap_or(false),
        };
        self.checker.params(&p)?;
        Ok(p)
    }
}

fn check_logprobs(param: &str, k: Option<u32>) -> Result<Option<usize>> {
    match k {
        Some(k) if k > MAX_TOP_LOGPROBS => Err(field(param, format!("at most {MAX_TOP_LOGPROBS} alternatives"))),
        other => Ok(other.map(|k| k as usize)),
    }
}

/// Longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Checks a client's `Idempotency-Key` header: 1-255 visible ASCII characters.
pub fn idempotency_key(raw: Option<&[u8]>) -> Result<Option<String>> {
    let Some(raw) = raw else { return Ok(None) };
    match std::str::from_utf8(raw) {
        Ok(k)
            if !k.is_empty()
                && k.len() <= MAX_IDEMPOTENCY_KEY
                && k.bytes().all(|b| b.is_ascii_graphic() || b == b' ') =>
        {
            Ok(Some(k.to_string()))
        }
        _ => Err(field(
            "Idempotency-Key",
            format!("the Idempotency-Key header must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        )),
    }
}

/// Checks a request's `metadata` (at most 16 entries, keys ≤ 64 and values ≤ 512 characters).
fn check_metadata(m: Option<BTreeMap<String, String>>) -> Result<Vec<(String, String)>> {
    let m = m.unwrap_or_default();
    if m.len() > MAX_METADATA {
        return Err(field("metadata", format!("at most {MAX_METADATA} entries")));
    }
    for (k, v) in &m {
        if k.chars().count() > 64 || v.chars().count() > 512 {
            return Err(field(
                &format!("metadata.{k}"),
                "metadata keys are at most 64 characters and values at most 512",
            ));
        }
    }
    Ok(m.into_iter().collect())
}
