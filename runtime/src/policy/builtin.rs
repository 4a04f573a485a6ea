//! The built-in policies: the official router, token pricer and proportional attributor plugins,
//! compiled natively into the server. They answer when a slot has no plugin, and whenever a
//! plugin fails in a fail-open slot.

use openlora_plugin_proportional_attributor::ProportionalAttributor;
use openlora_plugin_router::DefaultRouter;
use openlora_plugin_token_pricer::TokenPricer;
use std::cell::Cell;

use openlora_sdk::{Attributor, Level, Money, PluginConfig, Pricer, RequestInfo, RouteDecision, Router, Split, Usage};

use super::config::PolicyConfig;
use super::log::plugin_log;
use crate::error::{Error, Result};

thread_local! {
    /// The slot of the built-in running on this thread, for its log lines.
    static RUNNING: Cell<&'static str> = const { Cell::new("builtin") };
}

/// Runs `f` as the built-in of `slot` (its log lines name the slot).
fn running<T>(slot: &'static str, f: impl FnOnce() -> T) -> T {
    let outer = RUNNING.with(|r| r.replace(slot));
    let out = f();
    RUNNING.with(|r| r.set(outer));
    out
}

/// Where the built-ins' `openlora_sdk::log` lines go: `tracing` events, like a plugin's lines.
fn forward_log(level: Level, line: &str) {
    let slot = RUNNING.with(Cell::get);
    plugin_log(slot, &builtin_label(slot), level, line);
}

/// Sends natively run plugin code's log lines to `tracing` (process-wide, idempotent). Without
/// it the SDK would print them to stderr; nothing is ever kept in memory.
pub fn install_log_sink() {
    // A sink installed earlier (by an embedding program) stays.
    let _ = openlora_sdk::set_native_log_sink(forward_log);
}

/// The name a built-in decision is recorded under (in place of a plugin's sha256).
pub fn builtin_label(slot: &str) -> String {
    format!("builtin:{slot}@{}", env!("CARGO_PKG_VERSION"))
}

/// The built-in policies, configured from `[policy.slots.<slot>.builtin]`.
pub struct Builtins {
    router: <DefaultRouter as Router>::Config,
    pricer: <TokenPricer as Pricer>::Config,
    attributor: <ProportionalAttributor as Attributor>::Config,
    /// The configuration JSON of each, as given (for replay records).
    pub configs: [String; 3],
    /// Their sha256 (hex), as the ledger names them (`None`: not configured).
    pub config_hashes: [Option<String>; 3],
}

fn parse<C: PluginConfig>(slot: &str, json: &str, check: fn(&C) -> std::result::Result<(), String>) -> Result<C> {
    let field = format!("policy.slots.{slot}.builtin");
    let config = C::parse(json).map_err(|m| Error::config("server config", &field, m))?;
    check(&config).map_err(|m| Error::config("server config", &field, m))?;
    Ok(config)
}

impl Builtins {
    /// Parses and checks each built-in's configuration; errors name the config field.
    pub fn new(config: &PolicyConfig) -> Result<Self> {
        let json = |slot: &str| config.slot(slot).builtin.map(|v| v.to_string()).unwrap_or_default();
        Self::from_json([json("router"), json("pricer"), json("attributor")])
    }

    /// The built-ins configured from JSON texts (router, pricer, attributor; empty: defaults),
    /// as recorded with each decision.
    pub fn from_json(configs: [String; 3]) -> Result<Self> {
        install_log_sink();
        Ok(Builtins {
            router: parse("router", &configs[0], DefaultRouter::check_config)?,
            pricer: parse("pricer", &configs[1], TokenPricer::check_config)?,
            attributor: parse("attributor", &configs[2], ProportionalAttributor::check_config)?,
            config_hashes: configs.each_ref().map(|c| super::wasm::config_sha256(c)),
            configs,
        })
    }

    /// Routes like the official router.
    pub fn route(&self, request: &RequestInfo) -> RouteDecision {
        running("router", || DefaultRouter::route(&self.router, request))
    }

    /// Prices like the official token pricer.
    pub fn price(&self, request: &RequestInfo, usage: &Usage) -> std::result::Result<Money, String> {
        running("pricer", || TokenPricer::price(&self.pricer, request, usage))
    }

    /// Attributes like the official proportional attributor.
    pub fn attribute(
        &self,
        request: &RequestInfo,
        usage: &Usage,
        charge: &Money,
    ) -> std::result::Result<Vec<Split>, String> {
        running("attributor", || ProportionalAttributor::attribute(&self.attributor, request, usage, charge))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use openlora_sdk::testing::{sample_request, take_logs};

    use super::*;

    /// Held by the tests that log through the built-ins: tracing caches whether a log line is
    /// wanted per call site for all threads, so one test logging with no subscriber while another
    /// installs its own can leave the second's line unwritten.
    static LOGGING: Mutex<()> = Mutex::new(());

    /// A router configuration under which `sample_request` is refused, with a log line.
    const REFUSING: &str = r#"{"tenants": {"acme": {"allow": ["other"]}}}"#;

    /// Each write appends to a shared buffer.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn routing_keeps_no_log_lines_in_memory() {
        let _logging = LOGGING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let builtins = Builtins::from_json([REFUSING.into(), String::new(), String::new()]).expect("config");
        let request = sample_request();
        for _ in 0..1000 {
            assert!(matches!(builtins.route(&request), RouteDecision::Reject(_)));
        }
        // Before the fix each refusal's line stayed in the SDK's thread-local buffer for good.
        let kept = take_logs();
        assert!(kept.is_empty(), "{} log lines kept in memory", kept.len());
    }

    #[test]
    fn log_lines_become_escaped_tracing_events() {
        let _logging = LOGGING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = Sink::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        let builtins = Builtins::from_json([
            r#"{"tenants": {"acme": {"allow": ["other"]}}, "aliases": {"startrek": "x\ny"}}"#.into(),
            String::new(),
            String::new(),
        ])
        .expect("config");
        tracing::subscriber::with_default(subscriber, || {
            tracing::callsite::rebuild_interest_cache();
            builtins.route(&sample_request());
        });
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("plugin log") && text.contains("slot=\"router\""), "{text}");
        assert!(text.contains(&format!("plugin=\"{}\"", builtin_label("router"))), "{text}");
        // The adapter name holds a newline: escaped inside the quoted field, not a new line.
        assert!(text.contains(r#"line="tenant acme refused adapter x\ny""#), "{text}");
    }
}
