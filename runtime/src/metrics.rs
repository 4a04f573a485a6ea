//! The runtime's Prometheus registry and the metric families each part reports into.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Adapter pager figures: hits, misses, load times, evictions and bytes per tier.
#[derive(Clone)]
pub struct PagerMetrics {
    /// Lookups that found the adapter in a tier (`tier` = `active` | `host`).
    pub hits: IntCounterVec,
    /// Lookups that had to go to the next tier down (`tier` = `active` | `host`).
    pub misses: IntCounterVec,
    /// Seconds to bring an adapter into a tier (`tier` = `host` from disk, `active` from host).
    pub load_seconds: HistogramVec,
    /// Adapters evicted from a tier (`tier` = `active` | `host`).
    pub evictions: IntCounterVec,
    /// Bytes held per tier (`tier` = `disk` registered | `host` | `active`).
    pub resident_bytes: IntGaugeVec,
    /// Adapter loads that failed (corrupt or vanished files).
    pub load_failures: IntCounterVec,
}

/// Engine figures: queue depth, running sequences, batch sizes, KV use, preemptions.
#[derive(Clone)]
pub struct EngineMetrics {
    /// Requests waiting.
    pub queue_depth: IntGauge,
    /// Sequences running.
    pub running: IntGauge,
    /// Sequences per step.
    pub batch_seqs: Histogram,
    /// Tokens per step.
    pub batch_tokens: Histogram,
    /// Seconds per step.
    pub step_seconds: Histogram,
    /// KV blocks in use.
    pub kv_blocks_used: IntGauge,
    /// Sequences preempted (to be recomputed).
    pub preemptions: IntCounter,
}

/// HTTP figures: requests by adapter and status, time to first token, time per output token.
#[derive(Clone)]
pub struct HttpMetrics {
    /// Requests by `model` (base model or adapter) and `status` (`ok` or an error code).
    pub requests: IntCounterVec,
    /// Seconds from arrival to the first token.
    pub ttft_seconds: Histogram,
    /// Seconds per output token after the first.
    pub tpot_seconds: Histogram,
}

/// Every metric the runtime exposes, in one registry.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Adapter pager metrics.
    pub pager: PagerMetrics,
    /// Engine metrics.
    pub engine: EngineMetrics,
    /// HTTP metrics.
    pub http: HttpMetrics,
}

fn counter(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    reg.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn register<M: prometheus::core::Collector + Clone + 'static>(reg: &Registry, m: prometheus::Result<M>) -> M {
    let m = m.expect("valid metric definition");
    reg.register(Box::new(m.clone())).expect("metric registered once");
    m
}

impl Metrics {
    /// A fresh registry with every metric family registered.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("openlora".into()), None).expect("valid registry prefix");
        let r = &registry;
        let load_seconds = HistogramVec::new(
            HistogramOpts::new("adapter_load_seconds", "Seconds to bring an adapter into a tier")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            &["tier"],
        )
        .expect("valid histogram");
        registry.register(Box::new(load_seconds.clone())).expect("metric registered once");
        let resident_bytes =
            IntGaugeVec::new(Opts::new("adapter_resident_bytes", "Adapter bytes held per tier"), &["tier"])
                .expect("valid gauge");
        registry.register(Box::new(resident_bytes.clone())).expect("metric registered once");
        let pager = PagerMetrics {
            hits: counter(r, "adapter_hits_total", "Adapter lookups served by a tier", &["tier"]),
            misses: counter(r, "adapter_misses_total", "Adapter lookups a tier could not serve", &["tier"]),
            load_seconds,
            evictions: counter(r, "adapter_evictions_total", "Adapters evicted from a tier", &["tier"]),
            resident_bytes,
            load_failures: counter(r, "adapter_load_failures_total", "Adapter loads that failed", &["reason"]),
        };
        let engine = EngineMetrics {
            queue_depth: register(r, IntGauge::new("queue_depth", "Requests waiting to run")),
            running: register(r, IntGauge::new("running_sequences", "Sequences running")),
            batch_seqs: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("batch_sequences", "Sequences per engine step")
                        .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
                ),
            ),
            batch_tokens: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("batch_tokens", "Tokens per engine step")
                        .buckets(vec![1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0]),
                ),
            ),
            step_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("step_seconds", "Seconds per engine step")
                        .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
                ),
            ),
            kv_blocks_used: register(r, IntGauge::new("kv_blocks_used", "KV cache blocks in use")),
            preemptions: register(r, IntCounter::new("preemptions_total", "Sequences preempted for recompute")),
        };
        let latency = || vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let http = HttpMetrics {
            requests: counter(r, "requests_total", "Inference requests by model and status", &["model", "status"]),
            ttft_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("time_to_first_token_seconds", "Seconds to the first token").buckets(latency()),
                ),
            ),
            tpot_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("time_per_output_token_seconds", "Seconds per output token after the first")
                        .buckets(latency()),
                ),
            ),
        };
        Metrics { registry, pager, engine, http }
    }

    /// The registry in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let enc = prometheus::TextEncoder::new();
        // Encoding our own well-formed families into a String cannot fail.
        let _ = enc.encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
