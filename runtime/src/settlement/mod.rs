//! Settlement: the life of a request's money, outside the HTTP layer. For each request:
//! claim its idempotency key → route it (policy) → resolve its adapter once, to the version it
//! runs with and is recorded with → queue it in the engine → when it ends, price and attribute
//! its usage (policy) → write its ledger entry → hand back the `billing` object.
//!
//! The HTTP layer only maps what this returns to JSON or SSE.

mod context;
mod metered;
mod record;
mod service;

pub use context::SettleError;
pub use metered::Metered;
pub use record::billing_json;
pub use service::{Admission, SettlementService};
