//! One validated request. Every rule a request must pass lives here, once: the API's fields
//! ([`Validator::prepare`]: byte sizes before tokenising, then the tokenizer, the chat template
//! and the sampling ranges) and the engine's ([`Checker`]: the model's context and vocabulary,
//! the KV pool's capacity, the adapter resolved to the exact version registered at admission).
//! The engine and the backends receive only a [`ValidRequest`] and trust it.

pub mod chat;
mod checker;
mod prepare;

pub use checker::{AdapterRef, Checked, Checker, GenerationRequest, ValidRequest};
pub use prepare::{ApiParams, Prepared, PromptInput, RequestLimits, Validator, idempotency_key};
