//! The engine loop: admission, preemption, one batched forward per step, token emission.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::FinishReason;
use super::backend::{Backend, Pick};
use super::sequence::{Progress, Sequence};
use super::{Core, EngineStats, Submission};
use crate::metrics::Metrics;
use crate::model::{AllocStatus, BlockPool, SeqBatch};
use crate::pager::Acquire;

/// Waiting requests whose adapters are prefetched each step.
const PREFETCH_AHEAD: usize = 8;

pub(super) struct Scheduler {
    /// The model, the pager and the configuration, core with the handles.
    core: Arc<Core>,
    backend: Box<dyn Backend>,
    metrics: Metrics,
    stats: Arc<Mutex<EngineStats>>,
    /// Requests not yet running (including preempted ones), in no particular order.
    waiting: Vec<Sequence>,
    /// Running sequences, oldest admission first.
    running: Vec<Sequence>,
    next_arrival: u64,
    steps: u64,
    preemptions: u64,
    max_batch_seqs: usize,
}

impl Scheduler {
    pub fn new(core: Arc<Core>, backend: Box<dyn Backend>, metrics: Metrics, stats: Arc<Mutex<EngineStats>>) -> Self {
        Scheduler {
            core,
            backend,
            metrics,
            stats,
            waiting: Vec::new(),
            running: Vec::new(),
            next_arrival: 0,
            steps: 0,
            preemptions: 0,
            max_batch_seqs: 0,
        }
    }

    fn enqueue(&mut self, sub: Submission) {
        self.waiting.push(Sequence::new(sub, self.next_arrival));
        self.next_arrival += 1;
    }

    /// Runs until every handle is dropped and no work is left.
    pub fn run(mut self, rx: Receiver<Submission>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(s) => self.enqueue(s),
                    Err(_) => return,
                }
            }
            while let Ok(s) = rx.try_recv() {
                self.enqueue(s);
            }
            if !self.step() {
                // Nothing could run (e.g. the adapter pool is full of pinned adapters): wait a
                // little for new work or for room, without spinning.
                match rx.recv_timeout(Duration::from_millis(2)) {
                    Ok(s) => self.enqueue(s),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) if self.running.is_empty() && self.waiting.is_empty() => return,
                    // Every handle is gone but work remains: finish it without spinning.
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }
    }

    /// Frees a sequence's blocks and adapter pin.
    fn release(kv: &mut BlockPool, seq: &mut Sequence) {
        kv.release(&mut seq.kv);
        seq.lease = None;
    }

    fn left_waiting(&self, n: usize) {
        self.core.waiting.fetch_sub(n, Ordering::Relaxed);
    }

    /// Why a sequence must end now, if it must: its caller left, or its deadline passed.
    fn ended(s: &Sequence, now: Instant) -> Option<FinishReason> {
        if s.cancelled() {
            Some(FinishReason::Cancelled)
        } else if s.request.deadline.is_some_and(|d| now >= d) {
            Some(FinishReason::Deadline)
        } else {
            None
        }
    }

    /// Removes the sequences of `list` that must end, keeping the others in order.
    fn take_ended(list: &mut Vec<Sequence>, now: Instant) -> Vec<(Sequence, FinishReason)> {
        let (mut ended, mut kept) = (Vec::new(), Vec::with_capacity(list.len()));
        for s in list.drain(..) {
            match Self::ended(&s, now) {
                Some(reason) => ended.push((s, reason)),
                None => kept.push(s),
            }
        }
        *list = kept;
        ended
    }

    /// Ends cancelled and expired requests, waiting or running, freeing what they hold.
    fn reap(&mut self, now: Instant) {
        let from_waiting = Self::take_ended(&mut self.waiting, now);
        self.left_waiting(from_waiting.len());
        let from_running = Self::take_ended(&mut self.running, now);
        for (mut s, reason) in from_waiting.into_iter().chain(from_running) {
            Self::release(self.backend.kv_mut(), &mut s);
            s.finish(reason);
        }
    }

    /// Moves the youngest running sequence back to the waiting queue; it will be recomputed.
    fn preempt_youngest(&mut self) {
        if let Some(mut s) = self.running.pop() {
            Self::release(self.backend.kv_mut(), &mut s);
            s.usage.preemptions += 1;
            self.preemptions += 1;
            self.metrics.engine.preemptions.inc();
            self.waiting.push(s);
            self.core.waiting.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One iteration. Returns whether a forward pass ran.
    fn step(&mut self) -> bool {
        let now = Instant::now();
        self.reap(now);
        let mut budget = self.core.config.max_batch_tokens;
        // Tokens each running sequence runs this step (0 = sits this step out).
        let mut chunks: Vec<usize> = Vec::with_capacity(self.running.len());
        let mut i = 0;
        while i < self.running.len() {
            let chunk = self.running[i].pending().min(budget);
            if chunk == 0 {
                chunks.push(0);
                i += 1;
                continue;
            }
            loop {
                match self.backend.kv_mut().reserve(&mut self.running[i].kv, chunk) {
                    AllocStatus::Ok => break,
                    AllocStatus::Later if self.running.len() > i + 1 => self.preempt_youngest(),
                    // Nothing younger to take blocks from: this sequence itself yields.
                    _ => {
                        self.preempt_youngest();
                        break;
                    }
                }
            }
            if i < self.running.len() {
                chunks.push(chunk);
                budget -= chunk;
                i += 1;
            }
        }
        self.admit(&mut budget, &mut chunks, now);
        for s in self.waiting.iter().filter(|s| s.lease.is_none()).take(PREFETCH_AHEAD) {
            if let Some(a) = &s.adapter {
                // The version the request was admitted with, not whichever is registered now.
                self.core.pager.load_in_background(&a.name, &a.manifest);
            }
        }
        let ran = chunks.iter().any(|&c| c > 0) && self.forward(&chunks);
        self.publish();
        ran
    }

    /// Admits waiting requests, highest (aged) priority first, FCFS within a priority, while
    /// the step's token budget, the running limit, the KV pool and the adapter pool allow.
    fn admit(&mut self, budget: &mut usize, chunks: &mut Vec<usize>, now: Instant) {
        let age_limit = self.core.config.age_limit;
        let key = |s: &Sequence| {
            let aged = now.duration_since(s.arrival) >= age_limit;
            (std::cmp::Reverse(if aged { i32::MAX } else { s.request.priority }), s.arrival_seq)
        };
        self.waiting.sort_by_key(key);
        // Requests whose adapter is still being read from disk (in the background) keep their
        // place; those behind them go ahead.
        let mut at = 0;
        while *budget > 0 && self.running.len() < self.core.config.max_running && at < self.waiting.len() {
            let s = &mut self.waiting[at];
            if let (Some(a), None) = (&s.adapter, s.lease.as_ref()) {
                let t0 = Instant::now();
                match self.core.pager.try_acquire_loaded(&a.name, &a.manifest) {
                    Ok(Acquire::Ready(lease)) => {
                        s.lease = Some(lease);
                        s.add_adapter_time(t0.elapsed());
                    }
                    Ok(Acquire::Loading) => {
                        at += 1;
                        continue;
                    }
                    // The adapter pool is full of pinned adapters: wait, in order.
                    Ok(Acquire::Later) => break,
                    Err(e) => {
                        let s = self.waiting.remove(at);
                        s.fail(e.to_string());
                        self.left_waiting(1);
                        continue;
                    }
                }
            }
            let chunk = s.pending().min(*budget);
            match self.backend.kv_mut().reserve(&mut s.kv, chunk) {
                AllocStatus::Ok => {}
                AllocStatus::Later => {
                    s.lease = None;
                    break;
                }
                AllocStatus::Impossible => {
                    let mut s = self.waiting.remove(at);
                    Self::release(self.backend.kv_mut(), &mut s);
                    s.fail("the request needs more KV cache than the whole pool".into());
                    self.left_waiting(1);
                    continue;
                }
            }
            let mut s = self.waiting.remove(at);
            self.left_waiting(1);
            if s.first_scheduled.is_none() {
                s.first_scheduled = Some(now);
                s.usage.queue_ms = now.duration_since(s.arrival).as_millis() as u64;
            }
            *budget -= chunk;
            chunks.push(chunk);
            self.running.push(s);
        }
    }

    /// Runs the model on every scheduled sequence and handles the tokens it yields.
    fn forward(&mut self, chunks: &[usize]) -> bool {
        let t0 = Instant::now();
        let total: usize = chunks.iter().sum();
        // A sequence whose prompt is not all in after this step has no token to choose yet.
        let picks: Vec<Pick> = self
            .running
            .iter()
            .zip(chunks)
            .filter(|(_, c)| **c > 0)
            .map(|(s, &c)| if s.pending() == c { s.pick() } else { Pick::Argmax })
            .collect();
        let result = {
            let mut batch: Vec<SeqBatch<'_>> = self
                .running
                .iter_mut()
                .zip(chunks)
                .filter(|(_, c)| **c > 0)
                .map(|(s, &c)| {
                    let start = s.kv.len();
                    SeqBatch {
                        tokens: &s.tokens[start..start + c],
                        kv: &mut s.kv,
                        adapter: s.lease.as_ref().map(|l| l.placed()),
                    }
                })
                .collect();
            self.max_batch_seqs = self.max_batch_seqs.max(batch.len());
            self.metrics.engine.batch_seqs.observe(batch.len() as f64);
            self.metrics.engine.batch_tokens.observe(total as f64);
            self.backend.step(&mut batch, &picks, &self.core.pager)
        };
        let elapsed = t0.elapsed();
        self.steps += 1;
        self.metrics.engine.step_seconds.observe(elapsed.as_secs_f64());
        let (mut rows, mut shares, mut loads) = match result {
            Ok(out) => (out.rows.into_iter(), out.shares.into_iter(), out.adapter_load.into_iter()),
            Err(e) => {
                // A failed step is a bug, not bad input: fail the requests in it, keep serving.
                let msg = format!("engine step failed: {e}");
                let mut keep = Vec::new();
                for (mut s, &c) in
                    std::mem::take(&mut self.running).into_iter().zip(chunks.iter().chain(std::iter::repeat(&0)))
                {
                    if c > 0 {
                        Self::release(self.backend.kv_mut(), &mut s);
                        s.fail(msg.clone());
                    } else {
                        keep.push(s);
                    }
                }
                self.running = keep;
                return true;
            }
        };
        let mut finished = Vec::new();
        for (i, (s, &c)) in self.running.iter_mut().zip(chunks).enumerate() {
            if c == 0 {
                continue;
            }
            let Some(row) = rows.next() else { break };
            s.add_step(elapsed, c, total);
            s.add_share(shares.next().unwrap_or_default());
            s.add_adapter_time(loads.next().unwrap_or_default());
            if s.pending() == 0
                && let Progress::Finished(reason) = s.push_token(&self.core.model, row)
            {
                finished.push((i, reason));
            }
        }
        for (i, reason) in finished.into_iter().rev() {
            let mut s = self.running.remove(i);
            Self::release(self.backend.kv_mut(), &mut s);
            s.finish(reason);
        }
        true
    }

    fn publish(&self) {
        let kv = self.backend.kv();
        let used = kv.total_blocks() - kv.free_blocks();
        let m = &self.metrics.engine;
        m.queue_depth.set(self.waiting.len() as i64);
        m.running.set(self.running.len() as i64);
        m.kv_blocks_used.set(used as i64);
        if let Ok(mut st) = self.stats.lock() {
            *st = EngineStats {
                steps: self.steps,
                running: self.running.len(),
                waiting: self.waiting.len(),
                kv_free_blocks: kv.free_blocks(),
                kv_total_blocks: kv.total_blocks(),
                preemptions: self.preemptions,
                max_batch_seqs: self.max_batch_seqs,
                device_fault: self.backend.fault(),
                running_adapters: adapter_names(&self.running),
                waiting_adapters: adapter_names(&self.waiting),
            };
        }
    }
}

/// The adapters of `seqs`, sorted, each once.
fn adapter_names(seqs: &[Sequence]) -> Vec<String> {
    let mut names: Vec<String> = seqs.iter().filter_map(|s| s.adapter.as_ref().map(|a| a.name.clone())).collect();
    names.sort_unstable();
    names.dedup();
    names
}
