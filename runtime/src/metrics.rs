//! The runtime's Prometheus registry and the metric families each part reports into.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Adapter pager figures: hits, misses, load times, evictions and bytes per tier.
#[derive(Clone)]
pub struct PagerMetrics {
    /// Lookups that found the adapter in a tier (`tier` = `active` | `host`).
    pub hits: IntCounterVec,
    /// Lookups that had to go to the next tier down (`tier` = `active` | `host`).
    pub misses: IntCounterVec,
    /// Seconds to bring an adapter into a tier (`tier` = `host` from disk, `active` from host,
    /// `device` from the active pool to a GPU's mirror of it).
    pub load_seconds: HistogramVec,
    /// Adapters evicted from a tier (`tier` = `active` | `host`).
    pub evictions: IntCounterVec,
    /// Bytes held per tier (`tier` = `disk` registered | `host` | `active`).
    pub resident_bytes: IntGaugeVec,
    /// Adapter loads that failed (corrupt or vanished files).
    pub load_failures: IntCounterVec,
    /// Seconds to bring an adapter into the active pool, under vLLM's name
    /// (`vllm:lora_adapter_load_seconds`, in [`VllmMetrics`]).
    pub vllm_load_seconds: Histogram,
}

/// vLLM's metric names, which the Kubernetes inference gateways scrape to pick a replica (queue
/// depth, KV use, which adapters each holds): a registry of their own, without our prefix. The
/// gauges are set from the engine and the pager at each scrape; the active pool is the `gpu`
/// level (on the CPU backend too: it is what a step computes with), the host cache the `cpu` one.
#[derive(Clone)]
pub struct VllmMetrics {
    /// The registry `/metrics` renders after ours.
    pub registry: Registry,
    /// `vllm:num_requests_waiting`.
    pub waiting: IntGauge,
    /// `vllm:num_requests_running`.
    pub running: IntGauge,
    /// `vllm:kv_cache_usage_perc` (0–1).
    pub kv_usage: Gauge,
    /// `vllm:gpu_cache_usage_perc`, its older name, still read by older pickers.
    pub gpu_cache_usage: Gauge,
    /// `vllm:cache_config_info{block_size,num_gpu_blocks}` = 1.
    pub cache_config: GaugeVec,
    /// `vllm:lora_requests_info{max_lora,running_lora_adapters,waiting_lora_adapters}` = the Unix
    /// time of its last update; the lists comma-separated without spaces.
    pub lora_requests_info: GaugeVec,
    /// `vllm:lora_adapter_loaded{adapter_name,level,pinned}` = 1 per adapter and level.
    pub lora_loaded: GaugeVec,
    /// `vllm:num_gpu_loaded_lora_adapters`.
    pub gpu_loaded: IntGauge,
    /// `vllm:num_cpu_loaded_lora_adapters`.
    pub cpu_loaded: IntGauge,
    /// `vllm:max_gpu_lora_adapters`.
    pub max_gpu: IntGauge,
    /// `vllm:lora_adapter_load_seconds`.
    pub load_seconds: Histogram,
}

impl VllmMetrics {
    fn new() -> Self {
        let r = Registry::new();
        let gauge_vec =
            |name: &str, help: &str, labels: &[&str]| register(&r, GaugeVec::new(Opts::new(name, help), labels));
        VllmMetrics {
            waiting: register(&r, IntGauge::new("vllm:num_requests_waiting", "Requests waiting to run")),
            running: register(&r, IntGauge::new("vllm:num_requests_running", "Requests running")),
            kv_usage: register(&r, Gauge::new("vllm:kv_cache_usage_perc", "KV cache use, 0 to 1")),
            gpu_cache_usage: register(&r, Gauge::new("vllm:gpu_cache_usage_perc", "KV cache use, 0 to 1 (old name)")),
            cache_config: gauge_vec(
                "vllm:cache_config_info",
                "KV cache configuration",
                &["block_size", "num_gpu_blocks"],
            ),
            lora_requests_info: gauge_vec(
                "vllm:lora_requests_info",
                "Running and waiting adapters; the value is the Unix time of the update",
                &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            ),
            lora_loaded: gauge_vec(
                "vllm:lora_adapter_loaded",
                "Adapters loaded, per level",
                &["adapter_name", "level", "pinned"],
            ),
            gpu_loaded: register(&r, IntGauge::new("vllm:num_gpu_loaded_lora_adapters", "Adapters in the active pool")),
            cpu_loaded: register(&r, IntGauge::new("vllm:num_cpu_loaded_lora_adapters", "Adapters in the host cache")),
            max_gpu: register(&r, IntGauge::new("vllm:max_gpu_lora_adapters", "Adapters the active pool can hold")),
            load_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "vllm:lora_adapter_load_seconds",
                        "Seconds to load an adapter into the active pool",
                    )
                    .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
                ),
            ),
            registry: r,
        }
    }
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

/// Policy plugin figures: calls, failures by kind, quarantines, call time and fuel.
#[derive(Clone)]
pub struct PolicyMetrics {
    /// Decisions by `slot` and who answered (`plugin`, `builtin`, `fallback` after a failure, `rejected`).
    pub decisions: IntCounterVec,
    /// Plugin failures by `slot` and `kind` (fuel, deadline, memory, stack, output, trap, invalid, declined).
    pub failures: IntCounterVec,
    /// Plugins quarantined after repeated failures, by `slot`.
    pub quarantines: IntCounterVec,
    /// Seconds per plugin call (instantiation included when no instance was warm), by `slot`.
    pub call_seconds: HistogramVec,
    /// Fuel used by plugin calls, by `slot`.
    pub fuel: IntCounterVec,
    /// Plugin versions loaded (uploaded or dropped in) by `outcome` (`ok` or `refused`).
    pub loads: IntCounterVec,
}

/// Ledger figures: entries written, duplicates refused, write failures, commit time and batch size.
#[derive(Clone)]
pub struct LedgerMetrics {
    /// Entries written, by `outcome` (`completed`, `cancelled`, `failed`).
    pub entries: IntCounterVec,
    /// Entries not written because their request key was already in the ledger.
    pub duplicates: IntCounter,
    /// Entries that could not be written (the client got an error).
    pub write_failures: IntCounter,
    /// Seconds per commit (one commit writes a batch of entries).
    pub commit_seconds: Histogram,
    /// Entries per commit.
    pub batch_entries: Histogram,
}

impl LedgerMetrics {
    /// Metrics registered nowhere (for tools and tests that run a ledger outside a server).
    pub fn detached() -> Self {
        Metrics::new().ledger
    }
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
    /// Policy plugin metrics.
    pub policy: PolicyMetrics,
    /// Ledger metrics.
    pub ledger: LedgerMetrics,
    /// vLLM's names for the gateways.
    pub vllm: VllmMetrics,
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
        let vllm = VllmMetrics::new();
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
            vllm_load_seconds: vllm.load_seconds.clone(),
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
        let policy = PolicyMetrics {
            decisions: counter(
                r,
                "policy_decisions_total",
                "Policy decisions by slot and who answered",
                &["slot", "by"],
            ),
            failures: counter(r, "plugin_failures_total", "Plugin call failures by slot and kind", &["slot", "kind"]),
            quarantines: counter(
                r,
                "plugin_quarantines_total",
                "Plugins quarantined after repeated failures",
                &["slot"],
            ),
            call_seconds: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new("plugin_call_seconds", "Seconds per plugin call")
                        .buckets(vec![0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.025, 0.1]),
                    &["slot"],
                ),
            ),
            fuel: counter(r, "plugin_fuel_total", "Fuel used by plugin calls", &["slot"]),
            loads: counter(r, "plugin_loads_total", "Plugin versions offered, by outcome", &["outcome"]),
        };
        let ledger = LedgerMetrics {
            entries: counter(r, "ledger_entries_total", "Ledger entries written, by outcome", &["outcome"]),
            duplicates: register(
                r,
                IntCounter::new("ledger_duplicates_total", "Entries refused: request key already in the ledger"),
            ),
            write_failures: register(
                r,
                IntCounter::new("ledger_write_failures_total", "Ledger entries that could not be written"),
            ),
            commit_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("ledger_commit_seconds", "Seconds per ledger commit")
                        .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5]),
                ),
            ),
            batch_entries: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("ledger_batch_entries", "Entries per ledger commit")
                        .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
                ),
            ),
        };
        Metrics { registry, pager, engine, http, policy, ledger, vllm }
    }

    /// The registry in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let enc = prometheus::TextEncoder::new();
        // Encoding our own well-formed families into a String cannot fail.
        let _ = enc.encode_utf8(&self.registry.gather(), &mut out);
        let _ = enc.encode_utf8(&self.vllm.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
