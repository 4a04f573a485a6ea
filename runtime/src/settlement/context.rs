//! What a request carries through settlement, and how settlement fails.

use std::sync::Arc;

use openlora_sdk::RequestInfo;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::ledger::{Artifact, Decider, KeyGuard};

/// Why a request could not be admitted.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// A request with the same idempotency key is running.
    #[error("a request with this Idempotency-Key is still running")]
    KeyInUse,
    /// A request with the same idempotency key already has its entry; its billing is attached.
    #[error("a request with this Idempotency-Key already completed and was billed once; its billing is attached")]
    KeyReused {
        /// The first request's `billing` object.
        billing: Box<Value>,
    },
    /// Routing, the adapter, the engine or the ledger refused or failed.
    #[error(transparent)]
    Failed(#[from] Error),
    /// A settlement task panicked (a bug).
    #[error("{0} task failed")]
    Panicked(&'static str),
}

/// What a request carries from admission to its ledger entry.
#[derive(Clone)]
pub(crate) struct Context {
    /// What the plugins are told about the request (adapter and owner as routed).
    pub info: RequestInfo,
    /// Who routed it.
    pub routed_by: Decider,
    /// The router plugin's `(sha256, bytes)`, kept from routing when the ledger may not hold
    /// them yet.
    pub router_blob: Option<(String, Vec<u8>)>,
    /// The adapter version it was admitted with (name and sha256).
    pub adapter: Option<Artifact>,
    /// The key its ledger entry is unique by.
    pub key: String,
    /// Holds a client's idempotency key until the entry is written (held, never read).
    pub _guard: Option<Arc<KeyGuard>>,
}

/// Runs blocking work (the ledger, plugin calls) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> Result<T, SettleError> + Send + 'static,
) -> Result<T, SettleError> {
    // The request's span follows the work, so plugin log lines carry the request id.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work)).await.map_err(|_| SettleError::Panicked(what))?
}
