//! Benchmark, parity and random-weight tooling: what `openlora bench`, `cargo bench` and the
//! tests use to exercise the serving path, kept apart from it (nothing in the serving path
//! depends on this module).
//!
//! On the host, for any build: [`random`] makes random weights (a Llama of any shape, PEFT
//! adapter folders or their weights in memory, the benchmark's Llama-7B shape) and [`serving`]
//! drives an engine as `serve` does, minus HTTP; [`workload`] is the S-LoRA request sequence,
//! [`slora`] its replay against an engine or, through [`http_client`], a running server,
//! [`cpu_bench`] `openlora bench --device cpu`, [`compare`] its report beside HF PEFT's and
//! [`chart`] their SVG; [`reference`] is the single-sequence decode loop the
//! engine's output is checked against. With the `cuda` feature: [`gpu_random`] makes
//! random weights on the device, [`arena`] holds in-memory adapters on it without a pager,
//! [`parity`] checks the GPU against the committed references and the CPU backend, and
//! [`bench`] is `openlora bench --device cuda:N` (parity, then throughput, the serving path's
//! included: [`serving_bench`]).

#[cfg(feature = "cuda")]
pub mod arena;
#[cfg(feature = "cuda")]
pub mod bench;
pub mod chart;
pub mod compare;
pub mod cpu_bench;
#[cfg(feature = "cuda")]
pub mod gpu_random;
pub mod http_client;
#[cfg(feature = "cuda")]
pub mod parity;
pub mod random;
pub mod reference;
pub mod serving;
#[cfg(feature = "cuda")]
pub mod serving_bench;
pub mod slora;
pub mod workload;

#[cfg(feature = "cuda")]
use std::path::PathBuf;

/// What `openlora bench --device cuda:N` runs ([`bench::run`]).
#[cfg(feature = "cuda")]
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The GPU.
    pub ordinal: usize,
    /// The repository's `tests/fixtures` for the parity checks (skipped when `None`).
    pub fixtures: Option<PathBuf>,
    /// Distinct adapters in the mixed batch.
    pub adapters: usize,
    /// Their rank.
    pub rank: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Prompt tokens per sequence.
    pub prompt: usize,
    /// New tokens per sequence.
    pub new_tokens: usize,
    /// Registered adapters for the popularity run (0 skips it).
    pub registered: usize,
    /// Only the parity checks (no throughput runs).
    pub parity_only: bool,
}
