//! The model's shape: its configuration (`config.json`, `generation_config.json`) and the
//! projections a LoRA adapter may attach to. A leaf: it names no other module but `error`, so
//! adapters, the pager, the engine and the backends can all know a model's shape without
//! depending on how it runs.

pub mod config;
pub mod family;
mod proj;

pub(crate) use config::read_json;
pub use config::{GenerationDefaults, LayerExtras, ModelConfig, RopeScaling, WeightDType};
pub use family::Family;
pub use proj::Proj;
