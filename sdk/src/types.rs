//! Plain Rust forms of the `openlora:policy` types, shared by plugins, their tests and the host.

use serde::{Deserialize, Serialize};

/// An amount of money in integer micro-units of `currency` (1 unit = 1,000,000 micro-units).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    /// Micro-units.
    pub amount: u64,
    /// ISO 4217 code (e.g. "USD") or a ledger-defined unit (e.g. "CREDIT").
    pub currency: String,
}

impl Money {
    /// `amount` micro-units of `currency`.
    pub fn new(amount: u64, currency: impl Into<String>) -> Self {
        Money { amount, currency: currency.into() }
    }
}

/// What the router, pricer and attributor know about a request.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestInfo {
    /// The server's id for the request (also the seed of the plugin's randomness).
    pub request_id: String,
    /// The tenant the API key belongs to.
    pub tenant: String,
    /// What the client asked for in `model`: the base model or an adapter name.
    pub requested_model: String,
    /// The adapter the request runs with, if any (after routing).
    #[serde(default)]
    pub adapter: Option<String>,
    /// The adapter's owner, as registered, if any.
    #[serde(default)]
    pub adapter_owner: Option<String>,
    /// Tokens in the prompt.
    #[serde(default)]
    pub prompt_tokens: u32,
    /// The most tokens the request may generate.
    #[serde(default)]
    pub max_tokens: u32,
    /// Client-supplied metadata, in the client's order.
    #[serde(default)]
    pub metadata: Vec<(String, String)>,
    /// Milliseconds since the Unix epoch when the request arrived (the plugin's clock).
    #[serde(default)]
    pub received_at_ms: u64,
}

impl RequestInfo {
    /// The ledger account of the request's adapter owner as the host names it — the account an
    /// operator's attributor pays the owner's share to, and whose share an `adapter:<name>`
    /// slot's attributor divides: `owner:<owner>`, the adapter's name standing in for an adapter
    /// without a recorded owner. `None` for a request on the base model.
    pub fn owner_account(&self) -> Option<String> {
        self.adapter_owner.as_deref().or(self.adapter.as_deref()).map(owner_account)
    }

    /// The first metadata value under `key`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// What serving one request used.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// Tokens in the prompt.
    #[serde(default)]
    pub prompt_tokens: u32,
    /// Tokens generated.
    #[serde(default)]
    pub completion_tokens: u32,
    /// Milliseconds waiting before the first step.
    #[serde(default)]
    pub queue_ms: u64,
    /// Milliseconds of the steps the request took part in.
    #[serde(default)]
    pub compute_ms: u64,
    /// Milliseconds spent bringing its adapter into the active pool.
    #[serde(default)]
    pub adapter_load_ms: u64,
    /// Steps the request took part in.
    #[serde(default)]
    pub steps: u32,
    /// Its share of each step (its tokens over the step's), summed, in millionths.
    #[serde(default)]
    pub batch_share_ppm: u64,
    /// The adapter's measured share of the output, in millionths (0..=1,000,000; 0 without an
    /// adapter): Σ|Δy| / (Σ|W·x| + Σ|Δy|), Δy the LoRA delta added to a projection's output W·x,
    /// over every element of every projection the adapter touches, in every layer, for every
    /// token of the request. The README gives typical values.
    #[serde(default)]
    pub adapter_contribution_ppm: u32,
}

impl Usage {
    /// Whether the adapter's measured share of the output (`adapter_contribution_ppm`, in
    /// millionths) reached `ppm`: the test a contribution threshold makes.
    pub fn contribution_at_least(&self, ppm: u32) -> bool {
        self.adapter_contribution_ppm >= ppm
    }
}

/// One payee's part of a charge.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Split {
    /// Who is paid (an account name the ledger knows, e.g. "base:meta", "owner:alice",
    /// "contributor:bob"; an adapter owner's account is "owner:<owner>", see
    /// [`RequestInfo::owner_account`]).
    pub payee: String,
    /// Micro-units, in the charge's currency.
    pub amount: u64,
    /// Why, for statements (e.g. "base model", "adapter", "operator").
    pub reason: String,
}

impl Split {
    /// A split of `amount` to `payee` for `reason`.
    pub fn new(payee: impl Into<String>, amount: u64, reason: impl Into<String>) -> Self {
        Split { payee: payee.into(), amount, reason: reason.into() }
    }
}

/// Where and how urgently to serve a request.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Route {
    /// The adapter to use; `None` for the base model.
    pub adapter: Option<String>,
    /// Scheduling priority; 0 is normal, higher runs first.
    pub priority: i32,
}

/// What the router decides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteDecision {
    /// Serve with this adapter at this priority.
    Serve(Route),
    /// Refuse the request; the reason is returned to the client.
    Reject(String),
}

/// How loud a log line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Detail for plugin authors.
    Debug,
    /// Normal operation.
    Info,
    /// Something odd but handled.
    Warn,
    /// Something failed.
    Error,
}

/// The ledger account of an adapter owner: the payee an operator's attributor pays the adapter's
/// share to, and whose split the owner's own attributor (if registered) divides further.
pub fn owner_account(owner: &str) -> String {
    format!("owner:{owner}")
}
