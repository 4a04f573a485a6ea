//! The native harness: run a plugin's logic under `cargo test` the way the host runs it in wasm —
//! configuration parsed and checked first, results validated by the same rules. Log lines are
//! kept for [`take_logs`] only while captured ([`capture_logs`], or inside `run_*`).

use std::cell::{Cell, RefCell};

use crate::money::{validate_currency, validate_splits};
use crate::{Attributor, Level, Money, PluginConfig, Pricer, RequestInfo, RouteDecision, Router, Split, Usage};

thread_local! {
    static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
    /// How many [`LogCapture`]s are alive on this thread.
    static CAPTURING: Cell<usize> = const { Cell::new(0) };
}

/// Keeps a log line for [`take_logs`] if this thread captures logs; `false` (nothing kept) if not.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn record_log(level: Level, message: &str) -> bool {
    if CAPTURING.with(Cell::get) == 0 {
        return false;
    }
    LOGS.with(|l| l.borrow_mut().push((level, message.to_string())));
    true
}

/// While alive, [`crate::log`] on this thread keeps its lines for [`take_logs`] (see [`capture_logs`]).
#[must_use = "logs are captured only while the guard lives"]
pub struct LogCapture {
    /// Not `Send`: the capture belongs to the thread that started it.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Drop for LogCapture {
    fn drop(&mut self) {
        CAPTURING.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

/// Starts capturing this thread's plugin log lines until the guard drops (`run_router`,
/// `run_pricer` and `run_attributor` capture on their own); read them with [`take_logs`].
pub fn capture_logs() -> LogCapture {
    CAPTURING.with(|c| c.set(c.get() + 1));
    LogCapture { _thread: std::marker::PhantomData }
}

/// The log lines this thread's plugin calls wrote (while captured) since the last call.
pub fn take_logs() -> Vec<(Level, String)> {
    LOGS.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

/// How many captured log lines wait for [`take_logs`] on this thread.
pub fn pending_logs() -> usize {
    LOGS.with(|l| l.borrow().len())
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
    let _capture = capture_logs();
    let config = configured(config_json, R::check_config)?;
    Ok(R::route(&config, request))
}

/// Configures `P` with `config_json` and prices `request`, checking the currency as the host does.
pub fn run_pricer<P: Pricer>(config_json: &str, request: &RequestInfo, usage: &Usage) -> Result<Money, String> {
    let _capture = capture_logs();
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
    let _capture = capture_logs();
    let config = configured(config_json, A::check_config)?;
    let splits = A::attribute(&config, request, usage, charge)?;
    validate_splits(charge, &splits)?;
    Ok(splits)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::{Route, log};

    struct Loud;

    impl Router for Loud {
        type Config = ();
        fn route(_: &(), request: &RequestInfo) -> RouteDecision {
            log(Level::Info, &format!("routing {}", request.request_id));
            RouteDecision::Serve(Route { adapter: None, priority: 0 })
        }
    }

    static SUNK: AtomicUsize = AtomicUsize::new(0);

    fn sink(_: Level, message: &str) {
        if message.starts_with("routing") {
            SUNK.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn lines_are_kept_only_while_captured() {
        crate::set_native_log_sink(sink);
        let request = sample_request();
        // Inside the harness: kept for take_logs.
        run_router::<Loud>("", &request).expect("routes");
        assert_eq!(take_logs(), vec![(Level::Info, "routing req-sample-1".to_string())]);
        // Called directly, as a host does: nothing is kept, the sink gets the line.
        let before = SUNK.load(Ordering::Relaxed);
        for _ in 0..100 {
            Loud::route(&(), &request);
        }
        assert_eq!(pending_logs(), 0);
        assert!(SUNK.load(Ordering::Relaxed) >= before + 100);
        // An explicit capture keeps them again, until it ends.
        {
            let _capture = capture_logs();
            Loud::route(&(), &request);
            assert_eq!(pending_logs(), 1);
        }
        Loud::route(&(), &request);
        assert_eq!(take_logs().len(), 1);
    }
}
