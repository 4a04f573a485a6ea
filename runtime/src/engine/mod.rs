//! The serving engine: one thread owns the model and runs iteration-level continuous batching
//! over the paged KV cache, mixing sequences of any adapters in every step.
//!
//! Callers [`EngineHandle::submit`] a [`GenerationRequest`] and read [`Event`]s from the
//! returned [`RequestStream`]; dropping the stream cancels the request within one step.

pub mod backend;
mod finish;
mod scheduler;
mod sequence;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::error::{Error, Result, SubmitError};
use crate::metrics::Metrics;
use crate::model::{KvDType, LoadedModel};
use crate::pager::AdapterPager;
pub use crate::request::GenerationRequest;
use crate::request::{AdapterRef, Checker, ValidRequest};
pub use finish::{Ended, FinishReason, StopScanner};

/// Limits and capacities of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Bytes of the KV cache pool (of the CPU backend; a GPU backend sizes its own).
    pub kv_cache_bytes: usize,
    /// What the CPU backend's KV cache keeps keys and values in (a GPU backend keeps bf16).
    pub kv_cache_dtype: KvDType,
    /// Most tokens (prefill and decode together) in one step.
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most requests waiting; beyond it `submit` answers [`Error::from(SubmitError::QueueFull)`].
    pub max_waiting: usize,
    /// A request waiting longer than this jumps ahead of every priority (no starvation).
    pub age_limit: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kv_cache_bytes: 256 << 20,
            kv_cache_dtype: KvDType::F32,
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 1024,
            age_limit: Duration::from_secs(10),
        }
    }
}

/// A generated token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Log-probability of the chosen token under the model.
    pub logprob: f32,
    /// `(token id, text, log-probability)` of the top alternatives, most likely first.
    pub top: Vec<(u32, String, f32)>,
}

/// What one request used: the inputs of pricing and attribution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Milliseconds from arrival to first being scheduled.
    pub queue_ms: u64,
    /// Milliseconds of the steps this request took part in.
    pub compute_ms: u64,
    /// Milliseconds spent bringing its adapter into the active pool (on a GPU, and onto the
    /// device: that upload happens inside a step, so it is in `compute_ms` too).
    pub adapter_load_ms: u64,
    /// Its share of each step it took part in (its tokens over the step's), summed, in millionths.
    pub batch_share_ppm: u64,
    /// Steps it took part in.
    pub steps: u32,
    /// Times it was preempted and recomputed.
    pub preemptions: u32,
    /// The adapter's measured share of the adapted projections' output, in millionths:
    /// Σ|LoRA delta| / (Σ|base projection| + Σ|LoRA delta|) over every token (0 without an adapter).
    pub adapter_contribution_ppm: u32,
}

impl Usage {
    /// The usage as policy plugins see it.
    pub fn for_policy(&self) -> openlora_sdk::Usage {
        openlora_sdk::Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            queue_ms: self.queue_ms,
            compute_ms: self.compute_ms,
            adapter_load_ms: self.adapter_load_ms,
            steps: self.steps,
            batch_share_ppm: self.batch_share_ppm,
            adapter_contribution_ppm: self.adapter_contribution_ppm,
        }
    }
}

/// What the engine sends back for a request.
#[derive(Debug, Clone)]
pub enum Event {
    /// A token was generated; `text` is the text it completes (may be empty mid-character).
    Token {
        /// The token id.
        id: u32,
        /// New text, final (stop strings already cut).
        text: String,
        /// Log-probabilities, if asked for.
        logprob: Option<TokenLogprob>,
    },
    /// The request ended.
    Done {
        /// Why.
        reason: FinishReason,
        /// What it used.
        usage: Usage,
    },
    /// The request failed (nothing more follows).
    Failed {
        /// Why, as the runtime's error text.
        message: String,
        /// What it used before failing.
        usage: Usage,
    },
}

/// The receiving end of one request; dropping it cancels the request.
pub struct RequestStream {
    /// The request's id.
    pub id: String,
    events: UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl RequestStream {
    /// The next event, or `None` once the engine is done with the request.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next event, blocking the thread (for non-async callers).
    pub fn next_blocking(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }

    /// Asks the engine to stop this request (as dropping the stream does).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// A snapshot of the engine's state, updated after every step.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    /// Steps run so far.
    pub steps: u64,
    /// Sequences running.
    pub running: usize,
    /// Requests waiting.
    pub waiting: usize,
    /// Free KV blocks.
    pub kv_free_blocks: usize,
    /// KV blocks in the pool.
    pub kv_total_blocks: usize,
    /// Preemptions so far.
    pub preemptions: u64,
    /// Largest number of sequences in one step so far.
    pub max_batch_seqs: usize,
    /// Why the device can run no more steps, once that happened (the server is then not ready).
    pub device_fault: Option<String>,
    /// The adapters of running sequences, sorted, each once.
    pub running_adapters: Vec<String>,
    /// The adapters of waiting requests, sorted, each once.
    pub waiting_adapters: Vec<String>,
}

pub(crate) struct Submission {
    request: GenerationRequest,
    adapter: Option<AdapterRef>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    arrival: Instant,
}

/// The handle callers share to submit requests; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Submission>,
    stats: Arc<Mutex<EngineStats>>,
    core: Arc<Core>,
}

/// What the engine thread and every handle share: the model, the pager and the rules.
struct Core {
    model: Arc<LoadedModel>,
    device: String,
    pager: AdapterPager,
    config: EngineConfig,
    checker: Checker,
    waiting: std::sync::atomic::AtomicUsize,
}

impl EngineHandle {
    /// Starts the engine thread for `model` on the CPU, reading adapters from `pager`.
    pub fn start(model: Arc<LoadedModel>, pager: AdapterPager, config: EngineConfig, metrics: Metrics) -> Result<Self> {
        let backend = backend::CpuBackend::new(model.clone(), config.kv_cache_bytes, config.kv_cache_dtype)?;
        Self::start_on(Box::new(backend), model, pager, config, metrics)
    }

    /// Starts the engine thread on `backend`, which runs `model`'s weights; `model` gives the
    /// configuration, tokenizer and stop tokens.
    pub fn start_on(
        backend: Box<dyn backend::Backend>,
        model: Arc<LoadedModel>,
        pager: AdapterPager,
        config: EngineConfig,
        metrics: Metrics,
    ) -> Result<Self> {
        let kv_total_blocks = backend.kv().total_blocks();
        if kv_total_blocks == 0 {
            return Err(Error::config("server configuration", "memory.kv_cache_bytes", "too small for one KV block"));
        }
        let (tx, rx) = channel();
        let stats = Arc::new(Mutex::new(EngineStats { kv_total_blocks, ..Default::default() }));
        let core = Arc::new(Core {
            model: model.clone(),
            device: backend.describe(),
            pager: pager.clone(),
            config: config.clone(),
            checker: Checker::new(model.config(), kv_total_blocks, pager.clone()),
            waiting: Default::default(),
        });
        let sched = scheduler::Scheduler::new(core.clone(), backend, metrics, stats.clone());
        std::thread::Builder::new()
            .name("openlora-engine".into())
            .spawn(move || sched.run(rx))
            .map_err(|e| Error::io("engine thread", e))?;
        Ok(EngineHandle { tx, stats, core })
    }

    /// The model the engine runs.
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.core.model
    }

    /// The device the engine runs on, in words.
    pub fn device(&self) -> &str {
        &self.core.device
    }

    /// The adapter pager the engine reads from.
    pub fn pager(&self) -> &AdapterPager {
        &self.core.pager
    }

    /// The latest stats snapshot.
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The engine's rules for requests (the model's context and vocabulary, the KV pool, the
    /// registered adapters).
    pub fn checker(&self) -> &Checker {
        &self.core.checker
    }

    /// Checks a request (see [`Checker::check`]) and queues it: for callers that build engine
    /// requests themselves (the CLI, benchmarks, tests).
    pub fn submit(&self, request: GenerationRequest) -> Result<RequestStream> {
        self.enqueue(self.core.checker.check(request)?)
    }

    /// Queues a validated request, or refuses it when the queue is full.
    pub fn enqueue(&self, request: ValidRequest) -> Result<RequestStream> {
        let (request, adapter) = request.into_parts();
        debug_assert!(!request.prompt_ids.is_empty() && request.params.max_tokens > 0);
        if self.core.waiting.load(Ordering::Relaxed) >= self.core.config.max_waiting {
            return Err(Error::from(SubmitError::QueueFull));
        }
        self.core.waiting.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let id = request.id.clone();
        let sub = Submission { request, adapter, events: etx, cancel: cancel.clone(), arrival: Instant::now() };
        if self.tx.send(sub).is_err() {
            self.core.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::from(SubmitError::EngineStopped));
        }
        Ok(RequestStream { id, events: erx, cancel })
    }
}
