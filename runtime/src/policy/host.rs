//! The policy host on the request path: route before serving, price and attribute after, each by
//! the slot's active plugin under its limits — or by the built-in when there is none, when the
//! plugin fails (fail-open), or never (fail-closed: the request is refused). Every decision names
//! who made it (plugin sha256 or built-in) so it can be replayed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use openlora_sdk::money::{validate_currency, validate_splits};
use openlora_sdk::{Level, Money, RequestInfo, RouteDecision, Split, Usage, owner_account};
use serde::{Deserialize, Serialize};

use super::builtin::{Builtins, builtin_label};
use super::config::{OnFailure, PolicyConfig};
use super::log::plugin_log;
use super::plugin::{CallFailure, Called, CompiledPlugin, FailureKind};
use super::registry::Registry;
use super::slot::Slot;
use super::wasm::WasmRuntime;
use crate::error::{Error, PolicyError, Result, SubmitError};
use crate::ledger::Decider;
use crate::ledger::entry::OwnerShare;
use crate::metrics::PolicyMetrics;

/// Calls a plugin must have made before its failure rate can quarantine it.
const MIN_CALLS_FOR_RATE: u32 = 20;

/// Longest adapter name a router may route to, in bytes.
const MAX_ROUTED_NAME_BYTES: usize = 128;

/// Longest reason a router may give for a rejection, in bytes.
const MAX_REJECT_BYTES: usize = 1024;

/// Checks a router's rejection reason as every decision is checked (here and by `plugin check`).
pub(crate) fn check_rejection(reason: &str) -> std::result::Result<(), String> {
    openlora_sdk::money::validate_text(reason, MAX_REJECT_BYTES).map_err(|m| format!("rejection: {m}"))
}

/// What routing decided.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The adapter to serve with (`None`: the base model).
    pub adapter: Option<String>,
    /// Scheduling priority.
    pub priority: i32,
    /// Who decided.
    pub by: Decider,
}

/// What a finished request costs and who gets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    /// The charge.
    pub charge: Money,
    /// Its splits; they sum to the charge exactly.
    pub splits: Vec<Split>,
    /// Who decided the price, the splits, and any adapter owner's sub-splits.
    pub deciders: Vec<Decider>,
    /// The adapter owner's share and where its division sits among the splits.
    pub owner_share: Option<OwnerShare>,
}

/// The plugins in their slots, the built-ins, and the failure policy.
pub struct PolicyHost {
    /// The installed plugins.
    pub(super) registry: Registry,
    builtins: Builtins,
    config: PolicyConfig,
    metrics: PolicyMetrics,
    /// Which adapters exist (set by the server; unset, every adapter slot is open).
    adapters: std::sync::OnceLock<Box<dyn Fn(&str) -> bool + Send + Sync>>,
}

/// Calls a slot's plugin.
type PluginCall<'a, T> = &'a dyn Fn(&Arc<CompiledPlugin>) -> std::result::Result<Called<T>, CallFailure>;

/// One slot call: the plugin's attempt and the built-in's answer.
struct Attempt<'a, T> {
    slot: &'a Slot,
    call: PluginCall<'a, T>,
    validate: &'a dyn Fn(&T) -> std::result::Result<(), String>,
    builtin: &'a dyn Fn() -> std::result::Result<T, String>,
    on_failure: OnFailure,
}

impl PolicyHost {
    /// A host with `config`'s limits, keeping plugins under `root` (`None`: in memory).
    pub fn new(config: &PolicyConfig, root: Option<PathBuf>, metrics: PolicyMetrics) -> Result<Self> {
        let runtime = WasmRuntime::new(config, root.as_ref().map(|r| r.join("cache")))?;
        let registry = Registry::open(runtime, root)?;
        let builtins = Builtins::new(config)?;
        Ok(PolicyHost { registry, builtins, config: config.clone(), metrics, adapters: Default::default() })
    }

    /// Counts a failure of the slot's active plugin, quarantining it after too many in a row.
    fn record_failure(&self, slot: &Slot, plugin: &CompiledPlugin, failure: &CallFailure) {
        let label = slot_label(slot);
        self.metrics.failures.with_label_values(&[label, failure.kind.label()]).inc();
        emit_logs(slot, plugin, &failure.logs);
        tracing::warn!(
            slot = %slot,
            plugin = plugin.short(),
            kind = failure.kind.label(),
            error = failure.to_string().as_str(),
            "plugin failed"
        );
        let Some(handle) = self.registry.existing(slot) else { return };
        let n = handle.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let (failed, calls) = handle.window.record(true);
        let rate = self.config.quarantine_rate_percent;
        let by_rate = rate > 0 && calls >= MIN_CALLS_FOR_RATE && failed * 100 >= rate * calls;
        if (n >= self.config.quarantine_after || by_rate) && !handle.quarantined.swap(true, Ordering::Relaxed) {
            self.metrics.quarantines.with_label_values(&[label]).inc();
            tracing::error!(
                slot = %slot,
                plugin = plugin.short(),
                in_a_row = n,
                failed_of_last = format!("{failed}/{calls}").as_str(),
                "plugin quarantined"
            );
        }
    }

    fn attempt<T>(&self, a: Attempt<'_, T>) -> Result<(T, Decider)> {
        let label = slot_label(a.slot);
        let handle = self.registry.existing(a.slot);
        let active = handle.as_ref().and_then(|h| h.active.load_full());
        let mut failure = None;
        if let (Some(handle), Some(active)) = (&handle, &active) {
            let quarantined = handle.quarantined.load(Ordering::Relaxed);
            let outcome = if quarantined {
                Err(CallFailure::new(FailureKind::Invalid, "quarantined after repeated failures"))
            } else {
                let called = (a.call)(&active.plugin);
                if let Ok(c) = &called {
                    self.metrics.call_seconds.with_label_values(&[label]).observe(c.stats.micros as f64 / 1e6);
                    self.metrics.fuel.with_label_values(&[label]).inc_by(c.stats.fuel);
                    emit_logs(a.slot, &active.plugin, &c.logs);
                }
                called.and_then(|c| {
                    (a.validate)(&c.value).map_err(|m| CallFailure::new(FailureKind::Invalid, m))?;
                    Ok(c)
                })
            };
            match outcome {
                Ok(called) => {
                    handle.failures.store(0, Ordering::Relaxed);
                    handle.window.record(false);
                    self.metrics.decisions.with_label_values(&[label, "plugin"]).inc();
                    let by = Decider {
                        slot: a.slot.to_string(),
                        plugin: format!("sha256:{}", active.info.sha256),
                        version: Some(active.info.version),
                        config: None,
                        config_sha256: active.plugin.config_sha256.clone(),
                        failure: None,
                        fuel: called.stats.fuel,
                    };
                    return Ok((called.value, by));
                }
                Err(f) => {
                    if !quarantined {
                        self.record_failure(a.slot, &active.plugin, &f);
                    }
                    if a.on_failure == OnFailure::Reject {
                        self.metrics.decisions.with_label_values(&[label, "rejected"]).inc();
                        return Err(Error::from(PolicyError::Failed {
                            slot: a.slot.to_string(),
                            message: f.to_string(),
                        }));
                    }
                    failure = Some(format!("plugin sha256:{} v{}: {f}", active.info.sha256, active.info.version));
                }
            }
        }
        let value = (a.builtin)()
            .and_then(|v| (a.validate)(&v).map(|_| v))
            .map_err(|message| Error::from(PolicyError::Failed { slot: a.slot.to_string(), message }))?;
        let by_label = if failure.is_some() { "fallback" } else { "builtin" };
        self.metrics.decisions.with_label_values(&[label, by_label]).inc();
        let config_sha256 = match a.slot {
            Slot::Router => self.builtins.config_hashes[0].clone(),
            Slot::Pricer => self.builtins.config_hashes[1].clone(),
            Slot::Attributor => self.builtins.config_hashes[2].clone(),
            Slot::Adapter(_) => None,
        };
        let plugin = match a.slot {
            Slot::Adapter(_) => builtin_label("owner-keeps-share"),
            other => builtin_label(&other.to_string()),
        };
        let by =
            Decider { slot: a.slot.to_string(), plugin, version: None, config: None, config_sha256, failure, fuel: 0 };
        Ok((value, by))
    }

    fn on_failure(&self, slot: &Slot) -> OnFailure {
        match slot {
            Slot::Adapter(_) => OnFailure::Builtin,
            other => self.config.slot(&other.to_string()).on_failure,
        }
    }

    /// Routes `request` (whose `adapter` is the requested name unless it names the base model).
    /// `adapter_exists` tells registered adapters apart; a plugin routing to an unregistered one
    /// other than the one asked for has failed.
    pub fn route(&self, request: &RequestInfo, adapter_exists: &dyn Fn(&str) -> bool) -> Result<Routed> {
        let slot = Slot::Router;
        let validate = |d: &RouteDecision| match d {
            RouteDecision::Serve(r) => match &r.adapter {
                // (the client's own long name is not the router's fault: it is unknown, a 404)
                Some(a) if a.len() > MAX_ROUTED_NAME_BYTES && request.adapter.as_deref() != Some(a.as_str()) => {
                    Err(format!("routed to an adapter name longer than {MAX_ROUTED_NAME_BYTES} bytes"))
                }
                Some(a) if !adapter_exists(a) && request.adapter.as_deref() != Some(a.as_str()) => {
                    Err(format!("routed to adapter {a:?}, which is not registered"))
                }
                _ => Ok(()),
            },
            RouteDecision::Reject(reason) => check_rejection(reason),
        };
        let (decision, by) = self.attempt(Attempt {
            slot: &slot,
            call: &|p| p.route(request),
            validate: &validate,
            builtin: &|| Ok(self.builtins.route(request)),
            on_failure: self.on_failure(&slot),
        })?;
        match decision {
            RouteDecision::Serve(route) => {
                if let Some(a) = &route.adapter
                    && !adapter_exists(a)
                {
                    return Err(Error::from(SubmitError::UnknownAdapter(a.clone())));
                }
                Ok(Routed { adapter: route.adapter, priority: route.priority, by })
            }
            RouteDecision::Reject(reason) => Err(Error::from(PolicyError::Rejected(reason))),
        }
    }

    /// Whether the router (the active plugin, or the built-in) would serve `tenant` with
    /// `adapter`: what `/v1/models` lists for the tenant. Nothing is recorded or counted (it
    /// decides no request); a plugin that fails here lists nothing.
    pub fn would_serve(&self, tenant: &str, adapter: &str, now_ms: u64) -> bool {
        let request = RequestInfo {
            request_id: format!("models-{tenant}"),
            tenant: tenant.to_string(),
            requested_model: adapter.to_string(),
            adapter: Some(adapter.to_string()),
            adapter_owner: None,
            prompt_tokens: 0,
            max_tokens: 0,
            metadata: Vec::new(),
            received_at_ms: now_ms,
        };
        let handle = self.registry.existing(&Slot::Router);
        let plugin =
            handle.as_ref().filter(|h| !h.quarantined.load(Ordering::Relaxed)).and_then(|h| h.active.load_full());
        let decision = match plugin {
            Some(active) => active.plugin.route(&request).ok().map(|c| c.value),
            None => Some(self.builtins.route(&request)),
        };
        matches!(decision, Some(RouteDecision::Serve(_)))
    }

    /// Prices a finished request and splits the charge: the pricer, the operator's attributor,
    /// then the adapter owner's attributor (if registered) on the owner's share.
    pub fn settle(&self, request: &RequestInfo, usage: &Usage) -> Result<Settlement> {
        let (charge, priced_by) = self.attempt(Attempt {
            slot: &Slot::Pricer,
            call: &|p| p.price(request, usage),
            validate: &|m: &Money| validate_currency(&m.currency),
            builtin: &|| self.builtins.price(request, usage),
            on_failure: self.on_failure(&Slot::Pricer),
        })?;
        let (mut splits, split_by) = self.attempt(Attempt {
            slot: &Slot::Attributor,
            call: &|p| p.attribute(request, usage, &charge),
            validate: &|s: &Vec<Split>| validate_splits(&charge, s),
            builtin: &|| self.builtins.attribute(request, usage, &charge),
            on_failure: self.on_failure(&Slot::Attributor),
        })?;
        let mut deciders = vec![priced_by, split_by];
        let slot = request.adapter.as_ref().map(|a| Slot::Adapter(a.clone()));
        let divided =
            slot.as_ref().is_some_and(|s| self.registry.existing(s).is_some_and(|h| h.active.load().is_some()));
        let owner_share = divide_owner_share(request, &charge, &mut splits, |share, original| {
            let Some(slot) = slot.as_ref().filter(|_| divided) else { return Ok(vec![original.clone()]) };
            let (sub, by) = self.attempt(Attempt {
                slot,
                call: &|p| p.attribute(request, usage, share),
                validate: &|s: &Vec<Split>| validate_splits(share, s),
                builtin: &|| Ok(vec![original.clone()]),
                on_failure: OnFailure::Builtin,
            })?;
            deciders.push(by);
            Ok::<_, Error>(sub)
        })?;
        validate_splits(&charge, &splits)
            .map_err(|message| Error::from(PolicyError::Failed { slot: "attributor".into(), message }))?;
        Ok(Settlement { charge, splits, deciders, owner_share })
    }

    /// Every slot with its versions, the active one marked.
    pub fn list(&self) -> Vec<super::SlotView> {
        self.registry.list()
    }

    /// The stored bytes of a plugin version, by sha256 (hex).
    pub fn blob(&self, sha256: &str) -> Option<Vec<u8>> {
        self.registry.blob(sha256)
    }

    /// A configuration a built-in or a loaded plugin version runs with, by sha256 (hex).
    pub fn config_text(&self, sha256: &str) -> Option<String> {
        let builtin = self.builtins.config_hashes.iter().position(|h| h.as_deref() == Some(sha256));
        match builtin {
            Some(i) => Some(self.builtins.configs[i].clone()),
            None => self.registry.config(sha256).map(|c| c.to_string()),
        }
    }

    /// Makes an installed version of a slot active.
    pub fn activate(&self, slot: &Slot, version: u32) -> Result<super::VersionInfo> {
        self.registry.activate(slot, version)
    }

    /// Makes the version active before the current one again (`None`: there was none).
    pub fn rollback(&self, slot: &Slot) -> Result<Option<super::VersionInfo>> {
        self.registry.rollback(slot)
    }

    /// Removes an installed version that is not active.
    pub fn remove_version(&self, slot: &Slot, version: u32) -> Result<()> {
        self.registry.remove_version(slot, version)
    }

    /// Leaves a slot with no active version (the built-in answers).
    pub fn deactivate(&self, slot: &Slot) -> Result<()> {
        self.registry.deactivate(slot)
    }

    /// The slot's active plugin version, if any (for benchmarks that call it directly).
    pub fn active(&self, slot: &Slot) -> Option<Arc<super::Active>> {
        self.registry.existing(slot).and_then(|h| h.active.load_full())
    }

    /// Whether a slot has an active plugin version.
    pub fn is_active(&self, slot: &Slot) -> bool {
        self.active(slot).is_some()
    }

    /// Tells the host which adapters exist, so that an adapter's slot takes a plugin only while
    /// the adapter is registered (through the admin API and the drop folder alike).
    pub fn bind_adapters(&self, exists: impl Fn(&str) -> bool + Send + Sync + 'static) {
        let _ = self.adapters.set(Box::new(exists));
    }

    /// Forgets an adapter's slot (its plugin stops serving; a later adapter of the same name
    /// starts with none): called when the adapter is deleted.
    pub fn forget_adapter(&self, adapter: &str) {
        match self.registry.remove(&Slot::Adapter(adapter.to_string())) {
            Ok(()) => tracing::info!(adapter, "the adapter's attributor was removed with it"),
            Err(Error::Policy(PolicyError::UnknownPlugin(_))) => {}
            Err(e) => tracing::error!(adapter, error = %e, "removing the adapter's attributor failed"),
        }
    }

    /// Installs a plugin (see [`Registry::install`]), counting the outcome; an adapter's slot
    /// only while the adapter is registered.
    pub fn install(&self, slot: &Slot, bytes: &[u8], config: &str, source: &str) -> Result<super::VersionInfo> {
        self.install_guarded(slot, bytes, config, source, &|_| Ok(()))
    }

    /// Installs a plugin if `allowed` (asked under the registry's lock, just before anything
    /// changes, with the slot's active version then: e.g. that the adapter still belongs to the
    /// owner installing for it, or that the version a configuration change started from is
    /// still the active one).
    pub fn install_guarded(
        &self,
        slot: &Slot,
        bytes: &[u8],
        config: &str,
        source: &str,
        allowed: &dyn Fn(Option<u32>) -> Result<()>,
    ) -> Result<super::VersionInfo> {
        let guard = |active: Option<u32>| {
            if let (Slot::Adapter(adapter), Some(exists)) = (slot, self.adapters.get())
                && !exists(adapter)
            {
                return Err(SubmitError::UnknownAdapter(adapter.clone()).into());
            }
            allowed(active)
        };
        let result = self.registry.install(slot, bytes, config, source, &guard);
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        self.metrics.loads.with_label_values(&[outcome]).inc();
        result
    }
}

/// Replaces the adapter owner's split (if there is one) by the splits `divide` makes of it: how
/// an adapter owner's attributor takes part, at serving time and on replay.
pub(crate) fn divide_owner_share<E>(
    request: &RequestInfo,
    charge: &Money,
    splits: &mut Vec<Split>,
    divide: impl FnOnce(&Money, &Split) -> std::result::Result<Vec<Split>, E>,
) -> std::result::Result<Option<OwnerShare>, E> {
    let Some(adapter) = &request.adapter else { return Ok(None) };
    let account = owner_account(request.adapter_owner.as_deref().unwrap_or(adapter));
    let Some(i) = splits.iter().position(|s| s.payee == account) else { return Ok(None) };
    let share = Money::new(splits[i].amount, charge.currency.clone());
    let original = splits[i].clone();
    let sub = divide(&share, &original)?;
    let count = sub.len();
    splits.splice(i..=i, sub);
    Ok(Some(OwnerShare { payee: original.payee, amount: original.amount, reason: original.reason, first: i, count }))
}

fn slot_label(slot: &Slot) -> &'static str {
    match slot {
        Slot::Router => "router",
        Slot::Pricer => "pricer",
        Slot::Attributor => "attributor",
        Slot::Adapter(_) => "adapter",
    }
}

fn emit_logs(slot: &Slot, plugin: &CompiledPlugin, logs: &[(Level, String)]) {
    let slot = slot.to_string();
    for (level, line) in logs {
        plugin_log(&slot, plugin.short(), *level, line);
    }
}
