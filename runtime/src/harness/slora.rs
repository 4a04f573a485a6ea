//! The S-LoRA workload replayed in real time against an engine in this process or a running
//! server (`openlora bench --url`): every request's time to first token and per output token,
//! throughput, SLO attainment and the adapter cache's hit rate and load time over the run.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::http_client::Endpoint;
use super::workload::{WorkloadSpec, quantile};
use crate::engine::{EngineHandle, Event, GenerationRequest};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::sampling::SamplingParams;

/// Who serves the requests.
pub enum Driver<'a> {
    /// An engine in this process (its metrics give the adapter cache's figures).
    Engine {
        /// The engine.
        engine: &'a EngineHandle,
        /// Its metrics.
        metrics: &'a Metrics,
    },
    /// A running server, over HTTP (its `/metrics` give the adapter cache's figures).
    Http {
        /// Where it is.
        endpoint: &'a Endpoint,
        /// The vocabulary size prompt token ids are drawn below.
        vocab: usize,
    },
}

/// A request meets its SLO when both its figures are within these.
#[derive(Debug, Clone, Copy)]
pub struct Slo {
    /// Time to first token.
    pub ttft: Duration,
    /// Time per output token after the first.
    pub tpot: Duration,
}

/// The adapter cache's counters at one moment (active tier).
#[derive(Debug, Clone, Copy, Default)]
struct CacheCounters {
    hits: f64,
    misses: f64,
    load_sum: f64,
    loads: f64,
}

impl Driver<'_> {
    fn vocab(&self) -> usize {
        match self {
            Driver::Engine { engine, .. } => engine.model().config().vocab_size,
            Driver::Http { vocab, .. } => *vocab,
        }
    }

    fn counters(&self) -> Result<CacheCounters> {
        match self {
            Driver::Engine { metrics, .. } => {
                let p = &metrics.pager;
                let load = p.load_seconds.with_label_values(&["active"]);
                Ok(CacheCounters {
                    hits: p.hits.with_label_values(&["active"]).get() as f64,
                    misses: p.misses.with_label_values(&["active"]).get() as f64,
                    load_sum: load.get_sample_sum(),
                    loads: load.get_sample_count() as f64,
                })
            }
            Driver::Http { endpoint, .. } => {
                let text = endpoint.metrics_text()?;
                let find = |name: &str| {
                    text.lines()
                        .find(|l| l.starts_with(name) && l.contains("tier=\"active\""))
                        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                        .unwrap_or(0.0)
                };
                Ok(CacheCounters {
                    hits: find("openlora_adapter_hits_total"),
                    misses: find("openlora_adapter_misses_total"),
                    load_sum: find("openlora_adapter_load_seconds_sum"),
                    loads: find("openlora_adapter_load_seconds_count"),
                })
            }
        }
    }
}

/// One request's timings, seconds from its arrival.
struct Timing {
    adapter: usize,
    ttft: f64,
    end: f64,
    tokens: usize,
}

impl Timing {
    fn tpot(&self) -> Option<f64> {
        (self.tokens > 1).then(|| (self.end - self.ttft) / (self.tokens - 1) as f64)
    }
}

/// Replays `spec`'s arrivals in real time through `driver`, request `i` going to adapter
/// `names[arrival.adapter]`; `progress` is told of each finished request.
pub fn run(
    driver: &Driver<'_>,
    names: &[String],
    spec: &WorkloadSpec,
    slo: Slo,
    progress: Option<&(dyn Fn(u64) + Send + Sync)>,
) -> Result<Value> {
    if names.is_empty() {
        return Err(Error::device("the workload needs at least one adapter"));
    }
    let arrivals = spec.arrivals();
    let vocab = driver.vocab();
    let before = driver.counters()?;
    let start = Instant::now();
    let timings = std::thread::scope(|s| -> Result<Vec<Timing>> {
        let mut readers = Vec::with_capacity(arrivals.len());
        for (i, a) in arrivals.iter().enumerate() {
            let due = start + Duration::from_secs_f64(a.at_s);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let prompt: Vec<u32> =
                (0..a.prompt).map(|t| ((11 + i * 7919 + t * 104_729) % (vocab - 1) + 1) as u32).collect();
            let name = &names[a.adapter % names.len()];
            let arrived = Instant::now();
            let (adapter, output) = (a.adapter, a.output);
            let finish = move |(ttft, tokens): (f64, usize)| {
                if let Some(p) = progress {
                    p(1);
                }
                Timing { adapter, ttft, end: arrived.elapsed().as_secs_f64(), tokens }
            };
            match driver {
                Driver::Engine { engine, .. } => {
                    let request = GenerationRequest {
                        id: format!("slora-{i}"),
                        prompt_ids: prompt,
                        params: SamplingParams { max_tokens: output, ignore_eos: true, ..Default::default() },
                        adapter: Some(name.clone()),
                        priority: 0,
                        deadline: None,
                        logprobs: None,
                    };
                    let stream = engine.submit(request)?;
                    readers.push(s.spawn(move || read_stream(stream, arrived).map(finish)));
                }
                Driver::Http { endpoint, .. } => {
                    readers.push(s.spawn(move || endpoint.complete(name, &prompt, output, arrived).map(finish)));
                }
            }
        }
        readers.into_iter().map(|r| r.join().map_err(|_| Error::device("a bench reader panicked"))?).collect()
    })?;
    let makespan = start.elapsed().as_secs_f64();
    let after = driver.counters()?;
    Ok(report(spec, &timings, makespan, slo, before, after, &arrivals))
}

/// Reads one in-process request to its end: seconds to its first token, and its tokens.
fn read_stream(mut stream: crate::engine::RequestStream, arrived: Instant) -> Result<(f64, usize)> {
    let (mut ttft, mut tokens) = (None, 0);
    loop {
        match stream.next_blocking() {
            Some(Event::Token { .. }) => {
                tokens += 1;
                ttft.get_or_insert_with(|| arrived.elapsed().as_secs_f64());
            }
            Some(Event::Done { .. }) => break,
            Some(Event::Failed { message, .. }) => return Err(Error::device(message)),
            None => return Err(Error::device("the engine stopped")),
        }
    }
    Ok((ttft.unwrap_or_else(|| arrived.elapsed().as_secs_f64()), tokens))
}

/// The run's figures, with every request's row so that each can be recomputed.
fn report(
    spec: &WorkloadSpec,
    timings: &[Timing],
    makespan: f64,
    slo: Slo,
    before: CacheCounters,
    after: CacheCounters,
    arrivals: &[super::workload::Arrival],
) -> Value {
    let ttfts: Vec<f64> = timings.iter().map(|t| t.ttft).collect();
    let tpots: Vec<f64> = timings.iter().filter_map(Timing::tpot).collect();
    let tokens: usize = timings.iter().map(|t| t.tokens).sum();
    let met = timings
        .iter()
        .filter(|t| t.ttft <= slo.ttft.as_secs_f64() && t.tpot().unwrap_or(0.0) <= slo.tpot.as_secs_f64())
        .count();
    let (hits, misses) = (after.hits - before.hits, after.misses - before.misses);
    let loads = after.loads - before.loads;
    let pct = |v: &[f64]| json!({"p50": quantile(v, 0.5), "p90": quantile(v, 0.9), "p99": quantile(v, 0.99)});
    json!({
        "spec": spec,
        "seconds": makespan,
        "requests": timings.len(),
        "req_per_s": timings.len() as f64 / makespan,
        "tok_per_s": tokens as f64 / makespan,
        "ttft_s": pct(&ttfts),
        "tpot_s": pct(&tpots),
        "slo": {"ttft_s": slo.ttft.as_secs_f64(), "tpot_s": slo.tpot.as_secs_f64(),
                "attainment": met as f64 / timings.len().max(1) as f64},
        "adapter_cache": {"hit_rate": hits / (hits + misses).max(1.0), "loads": loads,
                          "mean_load_s": (after.load_sum - before.load_sum) / loads.max(1.0)},
        "arrivals": arrivals,
        "per_request": timings.iter().map(|t| json!([t.adapter, t.ttft, t.end, t.tokens])).collect::<Vec<_>>(),
    })
}
