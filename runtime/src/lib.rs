//! openlora: one resident base model, many LoRA adapters, and exact, replayable accounting.
//!
//! This crate is the host: model loading and the forward pass (`model`), token sampling
//! (`sampling`), the generation loop (`generate`), the embedded default model (`embedded`),
//! policy plugins (`policy`) and the attribution ledger (`ledger`).

pub mod adapters;
pub mod api;
pub mod config;
pub mod device;
pub mod embedded;
pub mod engine;
pub mod error;
pub mod generate;
#[cfg(feature = "cuda")]
pub mod gpu;
/// Benchmark, parity and random-weight tooling (`openlora bench`, `cargo bench`, tests), not the serving path.
pub mod harness;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod pager;
pub mod policy;
pub mod sampling;
pub mod serve;

pub use error::{Error, Result};
