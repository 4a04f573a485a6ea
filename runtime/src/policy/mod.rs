//! Policy plugins: routers, pricers and attributors as sandboxed wasm components, hot-loaded
//! into slots, with the built-in policies answering whenever a plugin is absent or fails.

pub mod builtin;
pub mod check;
pub mod config;
mod deadline;
pub mod dropdir;
pub mod dry_run;
pub mod host;
mod log;
pub mod plugin;
mod registry;
pub mod replay;
mod sandbox;
pub mod slot;
pub mod template;
mod warm;
pub mod wasm;

pub use crate::ledger::Decider;
pub use config::{OnFailure, PolicyConfig, SlotConfig};
pub use host::{PolicyHost, Routed, Settlement};
pub use plugin::{CallFailure, CallStats, Called, CompiledPlugin, FailureKind};
pub use registry::{Active, SlotView, VersionInfo};
pub use replay::Replayer;
pub use slot::{Slot, World};
pub use wasm::{WasmRuntime, sha256_hex};
