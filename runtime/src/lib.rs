//! openlora: one resident base model, many LoRA adapters, and exact, replayable accounting.
//!
//! The modules, bottom-up (each uses only those before it): `error`, `shape`, `metrics`,
//! `sampling`, `device`, `embedded`, `model`, `adapters`, `pager`, `request` (one validated
//! request), `engine` (continuous batching over a backend), `gpu` (the CUDA backend), `sql` (one
//! connection, either database), `ledger`, `accounts` (keys, owners, the audit trail),
//! `policy` (the wasm plugin host), `settlement` (a request's money, from its key to its ledger
//! entry), `api` (HTTP), `config` and `serve`; `harness` holds benchmark and parity tooling
//! apart from the serving path. `docs/ARCHITECTURE.md` tells the whole story.

pub mod accounts;
pub mod adapters;
pub mod api;
pub mod config;
pub mod device;
pub mod embedded;
pub mod engine;
pub mod error;
#[cfg(feature = "cuda")]
pub mod gpu;
/// Benchmark, parity and random-weight tooling (`openlora bench`, `cargo bench`, tests), not the serving path.
pub mod harness;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod pager;
pub mod policy;
pub mod request;
pub mod sampling;
pub mod serve;
pub mod settlement;
pub mod shape;
pub mod sql;

pub use error::{Error, Result};
