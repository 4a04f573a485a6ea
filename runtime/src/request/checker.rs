//! The engine's rules for a request, and the request types before and after them.

use std::sync::Arc;
use std::time::Instant;

use crate::adapters::AdapterManifest;
use crate::error::{Error, Result, SubmitError};
use crate::model::BLOCK_SIZE;
use crate::pager::AdapterPager;
use crate::sampling::SamplingParams;
use crate::shape::ModelConfig;

/// One request for the engine as its caller writes it (checked by [`Checker::check`]).
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Caller's id for this request (echoed in usage and logs).
    pub id: String,
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Adapter to run with, by registered name; `None` for the base model.
    pub adapter: Option<String>,
    /// Larger runs first; FCFS within a priority.
    pub priority: i32,
    /// Give up (finish with [`crate::engine::FinishReason::Deadline`]) past this instant.
    pub deadline: Option<Instant>,
    /// Return log-probabilities of each chosen token and this many alternatives (`None`: none).
    pub logprobs: Option<usize>,
}

/// The adapter a request was admitted with: its name and the exact version registered then,
/// which the request runs with and its ledger entry records, even if the name is replaced or
/// removed while it runs.
#[derive(Debug, Clone)]
pub struct AdapterRef {
    /// The registered name.
    pub name: String,
    /// The version (its folder, configuration and sha256).
    pub manifest: Arc<AdapterManifest>,
}

/// A request whose prompt and parameters passed every rule; its adapter is not resolved yet
/// (routing may still choose it).
#[derive(Debug, Clone)]
pub struct Checked(GenerationRequest);

impl Checked {
    /// The request.
    pub fn request(&self) -> &GenerationRequest {
        &self.0
    }

    /// Sets the adapter (by name; resolved by [`Checker::admit`]) and priority routing chose.
    pub fn route(&mut self, adapter: Option<String>, priority: i32) {
        self.0.adapter = adapter;
        self.0.priority = priority;
    }
}

/// A request that passed every rule, with its adapter resolved: what the engine accepts.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    request: GenerationRequest,
    adapter: Option<AdapterRef>,
}

impl ValidRequest {
    /// The request.
    pub fn request(&self) -> &GenerationRequest {
        &self.request
    }

    /// The adapter version it runs with.
    pub fn adapter(&self) -> Option<&AdapterRef> {
        self.adapter.as_ref()
    }

    /// Its parts, for the engine.
    pub fn into_parts(self) -> (GenerationRequest, Option<AdapterRef>) {
        (self.request, self.adapter)
    }
}

/// The engine's rules: the model's context and vocabulary, the KV pool's capacity and the
/// registered adapters. Cheap to clone.
#[derive(Clone)]
pub struct Checker {
    context: usize,
    vocab: usize,
    kv_total_blocks: usize,
    pager: AdapterPager,
}

impl Checker {
    /// The rules for a model of `config` whose KV pool holds `kv_total_blocks` blocks.
    pub fn new(config: &ModelConfig, kv_total_blocks: usize, pager: AdapterPager) -> Self {
        Checker { context: config.max_position_embeddings, vocab: config.vocab_size, kv_total_blocks, pager }
    }

    /// Checks the sampling parameters' ranges, naming the first out of range.
    pub fn params(&self, params: &SamplingParams) -> Result<()> {
        params.validate()
    }

    /// Checks everything but the adapter: the sampling parameters, an empty prompt, a prompt
    /// (plus one token) longer than the context, token ids outside the vocabulary, more KV than
    /// the whole pool. `max_tokens` is cut to what the context leaves.
    pub fn prompt(&self, request: GenerationRequest) -> Result<Checked> {
        self.params(&request.params)?;
        self.prompt_rules(request)
    }

    /// [`Checker::prompt`] for parameters [`Checker::params`] passed already.
    pub(super) fn prompt_rules(&self, mut request: GenerationRequest) -> Result<Checked> {
        let prompt = request.prompt_ids.len();
        if prompt == 0 {
            return Err(Error::invalid("prompt", "the prompt has no tokens"));
        }
        if prompt >= self.context {
            return Err(SubmitError::ContextOverflow { prompt_tokens: prompt, context: self.context }.into());
        }
        if let Some(bad) = request.prompt_ids.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(Error::invalid("prompt", format!("token id {bad} is outside the vocabulary")));
        }
        request.params.max_tokens = request.params.max_tokens.min(self.context - prompt);
        let needed = prompt + request.params.max_tokens;
        if needed.div_ceil(BLOCK_SIZE) > self.kv_total_blocks {
            return Err(SubmitError::KvExhausted { needed_tokens: needed, ever: false }.into());
        }
        Ok(Checked(request))
    }

    /// The version of adapter `name` registered now, if any.
    pub fn lookup(&self, name: &str) -> Option<AdapterRef> {
        self.pager.manifest(name).map(|manifest| AdapterRef { name: name.to_string(), manifest })
    }

    /// Resolves the request's adapter, once, to the version registered now.
    pub fn admit(&self, checked: Checked) -> Result<ValidRequest> {
        let adapter = match &checked.0.adapter {
            None => None,
            Some(name) => Some(self.lookup(name).ok_or_else(|| SubmitError::UnknownAdapter(name.clone()))?),
        };
        Ok(ValidRequest { request: checked.0, adapter })
    }

    /// Admits a request whose adapter was resolved already (`resolved` names the request's
    /// adapter, or it is looked up as [`Checker::admit`] does).
    pub fn admit_resolved(&self, checked: Checked, resolved: Option<AdapterRef>) -> Result<ValidRequest> {
        match resolved {
            Some(r) if checked.0.adapter.as_deref() == Some(r.name.as_str()) => {
                Ok(ValidRequest { request: checked.0, adapter: Some(r) })
            }
            _ => self.admit(checked),
        }
    }

    /// Both: [`Checker::prompt`], then [`Checker::admit`].
    pub fn check(&self, request: GenerationRequest) -> Result<ValidRequest> {
        self.admit(self.prompt(request)?)
    }
}
