//! The native harness: run a plugin's logic under `cargo test` the way the host runs it in wasm —
//! configuration parsed and checked first, results validated by the same rules.

use std::cell::RefCell;

use crate::money::{validate_currency, validate_splits};
use crate::{Attributor, Level, Money, PluginConfig, Pricer, RequestInfo, RouteDecision, Router, Split, Usage};

thread_local! {
    static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
}

/// Keeps a log line for [`take_logs`] (what [`crate::log`] does outside wasm).
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn record_log(level: Level, message: &str) {
    LOGS.with(|l| l.borrow_mut().push((level, message.to_string())));
}

/// The log lines this thread's plugin calls wrote since the last call.
pub fn take_logs() -> Vec<(Level, String)> {
    LOGS.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

/// A typical request: tenant `acme`, adapter `startrek` owned by `alice`, 100 prompt tokens.
pub fn sample_request() -> RequestInfo {
    RequestInfo {
        request_id: "req-sample-1".into(),
        tenant: "acme".into(),
        requested_model: "startrek".into(),
        adapter: Some("startrek".into()),
        adapter_owner: Some("alice".into()),
        prompt_tokens: 100,
        max_tokens: 64,
        metadata: vec![],
        received_at_ms: 1_790_000_000_000,
    }
}

/// What [`sample_request`] might have used: 100 prompt + 50 completion tokens, 30% adapter contribution.
pub fn sample_usage() -> Usage {
    Usage {
        prompt_tokens: 100,
        completion_tokens: 50,
        queue_ms: 3,
        compute_ms: 40,
        adapter_load_ms: 0,
        steps: 51,
        batch_share_ppm: 9_000_000,
        adapter_contribution_ppm: 300_000,
    }
}

fn configured<C: PluginConfig>(json: &str, check: fn(&C) -> Result<(), String>) -> Result<C, String> {
    let config = C::parse(json)?;
    check(&config)?;
    Ok(config)
}

/// Configures `R` with `config_json` and routes `request`.
pub fn run_router<R: Router>(config_json: &str, request: &RequestInfo) -> Result<RouteDecision, String> {
    let config = configured(config_json, R::check_config)?;
    Ok(R::route(&config, request))
}

/// Configures `P` with `config_json` and prices `request`, checking the currency as the host does.
pub fn run_pricer<P: Pricer>(config_json: &str, request: &RequestInfo, usage: &Usage) -> Result<Money, String> {
    let config = configured(config_json, P::check_config)?;
    let money = P::price(&config, request, usage)?;
    validate_currency(&money.currency)?;
    Ok(money)
}

/// Configures `A` with `config_json` and attributes `charge`, checking the splits as the host does.
pub fn run_attributor<A: Attributor>(
    config_json: &str,
    request: &RequestInfo,
    usage: &Usage,
    charge: &Money,
) -> Result<Vec<Split>, String> {
    let config = configured(config_json, A::check_config)?;
    let splits = A::attribute(&config, request, usage, charge)?;
    validate_splits(charge, &splits)?;
    Ok(splits)
}
