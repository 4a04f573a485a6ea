//! One compiled plugin version: a pool of fresh, configured instances kept warm off the request
//! path, and the typed calls that run each on one instance under fuel, deadline and memory caps.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openlora_sdk as sdk;
use serde::Serialize;
use wasmtime::component::{Instance, InstancePre};
use wasmtime::{Store, StoreLimitsBuilder, Trap};

use super::deadline::CallClock;
use super::sandbox::{RandomLimit, Sandbox, attribution, pricing, routing, wit};
use super::slot::World;
use super::warm::WarmPool;
use super::wasm::{EPOCH_TICK, Job, WasmRuntime, check_header, check_imports_exports, config_sha256, sha256_hex};
use crate::error::{Error, PolicyError, Result};

/// How a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Ran out of fuel (an endless or too-long computation).
    Fuel,
    /// Used its deadline of CPU time (or ran ten times it of wall time).
    Deadline,
    /// Tried to grow memory past the cap.
    Memory,
    /// Overflowed its wasm stack (e.g. unbounded recursion).
    Stack,
    /// Wrote more output than allowed.
    Output,
    /// Trapped for another reason (panic, unreachable, ...).
    Trap,
    /// Returned a result the host refuses (splits not summing to the charge, overflow, ...).
    Invalid,
    /// Returned an error of its own.
    Declined,
}

impl FailureKind {
    /// The label used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Fuel => "fuel",
            FailureKind::Deadline => "deadline",
            FailureKind::Memory => "memory",
            FailureKind::Stack => "stack",
            FailureKind::Output => "output",
            FailureKind::Trap => "trap",
            FailureKind::Invalid => "invalid",
            FailureKind::Declined => "declined",
        }
    }
}

/// Longest failure message kept (it may quote the plugin, and it reaches responses, the ledger
/// and logs), in bytes.
pub const MAX_FAILURE_BYTES: usize = 1024;

/// A failed plugin call: what kind of failure and the details.
#[derive(Debug, Clone)]
pub struct CallFailure {
    /// The kind of failure.
    pub kind: FailureKind,
    /// What happened, for logs and errors (at most [`MAX_FAILURE_BYTES`]).
    pub message: String,
    /// What the plugin logged during the failed call (a panic's message among them).
    pub logs: Vec<(sdk::Level, String)>,
}

impl CallFailure {
    /// A failure of `kind`; the message is cut to [`MAX_FAILURE_BYTES`].
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        CallFailure { kind, message: super::log::cap(message.into(), MAX_FAILURE_BYTES), logs: Vec::new() }
    }
}

impl fmt::Display for CallFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.label(), self.message)
    }
}

/// What a successful call cost.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CallStats {
    /// Fuel used by the call itself.
    pub fuel: u64,
    /// Wall-clock time of the call, in microseconds (including instantiation if no instance was warm).
    pub micros: u64,
    /// CPU time of the call itself on its thread, in microseconds: what its deadline counts.
    pub cpu_micros: u64,
    /// Whether a warm instance was used.
    pub warm: bool,
}

/// A configured instance, used for exactly one call and then dropped.
struct Warm {
    store: Store<Sandbox>,
    instance: Instance,
}

/// The export indices of the plugin's world.
enum Exports {
    Router(routing::GuestIndices),
    Pricer(pricing::GuestIndices),
    Attributor(attribution::GuestIndices),
}

impl WasmRuntime {
    /// Validates `bytes` as a plugin of `world` and prepares it for calls, configured with
    /// `config` (JSON; empty for none): the plugin's own `configure` must accept it.
    /// `what` names the file or upload in errors.
    pub fn load(self: &Arc<Self>, what: &str, bytes: &[u8], world: World, config: &str) -> Result<Arc<CompiledPlugin>> {
        let invalid = |message: String| Error::from(PolicyError::PluginInvalid { what: what.to_string(), message });
        if bytes.len() > self.limits.max_plugin_bytes {
            return Err(invalid(format!(
                "{} bytes is more than the limit of {} (policy.max_plugin_bytes)",
                bytes.len(),
                self.limits.max_plugin_bytes
            )));
        }
        check_header(bytes).map_err(invalid)?;
        let sha = sha256_hex(bytes);
        let component = self.compile(&sha, bytes).map_err(|e| invalid(format!("does not compile: {e:#}")))?;
        check_imports_exports(&self.engine, &component, world).map_err(invalid)?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| invalid(format!("cannot be linked: {e:#}")))?;
        let plugin = CompiledPlugin::new(self.clone(), sha, world, config.to_string(), bytes.len(), pre)
            .map_err(|e| invalid(format!("{e:#}")))?;
        let pool: std::sync::Weak<dyn WarmPool> = Arc::downgrade(&(plugin.clone() as Arc<dyn WarmPool>));
        self.track_pool(pool);
        // A first instance proves it instantiates and accepts its configuration; it stays warm.
        plugin.prime().map_err(|e| invalid(e.to_string()))?;
        // Only now is its compiled form worth keeping: a refused upload leaves nothing behind.
        self.remember(&plugin.sha256, &component);
        Ok(plugin)
    }
}

/// A validated, compiled plugin version, ready to call.
pub struct CompiledPlugin {
    /// The hex sha256 of the component's bytes.
    pub sha256: String,
    /// The world it exports.
    pub world: World,
    /// The configuration its instances are given (JSON; empty for none).
    pub config: String,
    /// The configuration's sha256 (hex), as the ledger names it; `None` for none.
    pub config_sha256: Option<String>,
    /// The component's size in bytes.
    pub size: usize,
    runtime: Arc<WasmRuntime>,
    pre: InstancePre<Sandbox>,
    exports: Exports,
    warm: Mutex<Vec<Warm>>,
    refilling: AtomicBool,
    /// When it was last called, on the warm budget's clock.
    last_used_ms: AtomicU64,
}

impl CompiledPlugin {
    pub(crate) fn new(
        runtime: Arc<WasmRuntime>,
        sha256: String,
        world: World,
        config: String,
        size: usize,
        pre: InstancePre<Sandbox>,
    ) -> wasmtime::Result<Arc<Self>> {
        let exports = match world {
            World::Router => Exports::Router(routing::GuestIndices::new(&pre)?),
            World::Pricer => Exports::Pricer(pricing::GuestIndices::new(&pre)?),
            World::Attributor => Exports::Attributor(attribution::GuestIndices::new(&pre)?),
        };
        let last_used_ms = AtomicU64::new(runtime.warm.now_ms());
        Ok(Arc::new(CompiledPlugin {
            sha256,
            world,
            config_sha256: config_sha256(&config),
            config,
            size,
            last_used_ms,
            runtime,
            pre,
            exports,
            warm: Mutex::new(Vec::new()),
            refilling: AtomicBool::new(false),
        }))
    }

    /// The first 12 hex digits of the sha256, for logs.
    pub fn short(&self) -> &str {
        &self.sha256[..12.min(self.sha256.len())]
    }

    /// Instantiates and configures one instance now, and keeps it warm if the server-wide
    /// budget has room; the error says why it failed. The pool fills up once calls come.
    pub(crate) fn prime(self: &Arc<Self>) -> Result<(), CallFailure> {
        let warm = self.fresh()?;
        self.keep_warm(warm);
        Ok(())
    }

    fn lock_warm(&self) -> std::sync::MutexGuard<'_, Vec<Warm>> {
        self.warm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts an instance in the warm pool if the budget has room (otherwise it is dropped);
    /// `false` when it was dropped.
    fn keep_warm(&self, warm: Warm) -> bool {
        if self.runtime.warm.reserve() {
            self.lock_warm().push(warm);
            true
        } else {
            self.runtime.background(Job::Discard(Box::new(warm)));
            false
        }
    }

    /// Takes a warm instance, if one is ready.
    fn take_warm(&self) -> Option<Warm> {
        let warm = self.lock_warm().pop();
        if warm.is_some() {
            self.runtime.warm.release(1);
        }
        warm
    }

    /// A new store and instance, configured; its own fuel and deadline budget.
    fn fresh(&self) -> Result<Warm, CallFailure> {
        let limits = &self.runtime.limits;
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.memory_bytes)
            .instances(64)
            .tables(64)
            .memories(8)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(&self.runtime.engine, Sandbox::new(store_limits, limits.output_bytes, &self.sha256));
        store.limiter(|s| &mut s.limits);
        // Bounds what one host call or one result copies out of the guest, checked by wasmtime
        // before it copies (aliased strings count once per use).
        store.set_hostcall_fuel(MAX_HOSTCALL_BYTES);
        store.set_fuel(limits.fuel).map_err(|e| classify(&e, limits))?;
        let limit = Duration::from_millis(limits.deadline_ms);
        store.epoch_deadline_callback(move |ctx| Ok(ctx.data().clock.verdict(limit, EPOCH_TICK)));
        self.arm_deadline(&mut store, false);
        let instance = self.pre.instantiate(&mut store).map_err(|e| classify(&e, limits))?;
        let configured = match &self.exports {
            Exports::Router(ix) => {
                ix.load(&mut store, &instance).and_then(|g| g.call_configure(&mut store, &self.config))
            }
            Exports::Pricer(ix) => {
                ix.load(&mut store, &instance).and_then(|g| g.call_configure(&mut store, &self.config))
            }
            Exports::Attributor(ix) => {
                ix.load(&mut store, &instance).and_then(|g| g.call_configure(&mut store, &self.config))
            }
        };
        configured
            .map_err(|e| classify(&e, limits))?
            .map_err(|e| CallFailure::new(FailureKind::Declined, format!("configuration refused: {e}")))?;
        store.data_mut().logs.clear();
        Ok(Warm { store, instance })
    }

    /// Starts the deadline of what `store` runs next: a new CPU budget (with a new wall-clock
    /// start unless `keep_wall`: a call on an instance just made shares its backstop), and the
    /// epoch at which the clock is first checked.
    fn arm_deadline(&self, store: &mut Store<Sandbox>, keep_wall: bool) {
        let clock = &mut store.data_mut().clock;
        *clock = if keep_wall { clock.restart_cpu() } else { CallClock::start() };
        store.set_epoch_deadline(self.runtime.deadline_ticks());
    }

    /// Asks the background thread to top up the warm pool (at most one request outstanding).
    fn schedule_refill(self: &Arc<Self>) {
        if self.runtime.limits.warm_instances == 0 || self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let plugin = Arc::downgrade(self);
        self.runtime.background(Job::Refill(Box::new(move || {
            if let Some(p) = plugin.upgrade() {
                p.refill()
            }
        })));
    }

    /// Instantiates and configures instances until the warm pool is full (background thread).
    pub(crate) fn refill(&self) {
        let target = self.runtime.limits.warm_instances;
        while self.lock_warm().len() < target {
            let Ok(w) = self.fresh() else { break };
            if !self.keep_warm(w) {
                break;
            }
        }
        self.refilling.store(false, Ordering::Release);
    }

    /// Runs `f` on one instance (warm if one is ready) under the call limits, then drops it.
    fn call<T>(
        self: &Arc<Self>,
        request: &sdk::RequestInfo,
        f: impl FnOnce(&Exports, &mut Store<Sandbox>, &Instance) -> wasmtime::Result<T>,
    ) -> Result<Called<T>, CallFailure> {
        let start = Instant::now();
        self.last_used_ms.store(self.runtime.warm.now_ms(), Ordering::Relaxed);
        let warm = self.take_warm();
        self.schedule_refill();
        let was_warm = warm.is_some();
        let (mut w, keep_wall) = match warm {
            Some(w) => (w, false),
            None => (self.fresh()?, true),
        };
        let limits = &self.runtime.limits;
        w.store.data_mut().prepare_call(request.received_at_ms, &request.request_id);
        w.store.set_fuel(limits.fuel).map_err(|e| classify(&e, limits))?;
        self.arm_deadline(&mut w.store, keep_wall);
        let result = f(&self.exports, &mut w.store, &w.instance);
        let cpu_micros = w.store.data().clock.cpu_used().map_or(0, |d| d.as_micros() as u64);
        let fuel = limits.fuel.saturating_sub(w.store.get_fuel().unwrap_or(0));
        let data = w.store.data_mut();
        let mut logs = std::mem::take(&mut data.logs);
        let contents = data.output.contents();
        let output = contents.get(data.output_before_call..).unwrap_or_default();
        if !output.is_empty() {
            logs.push((sdk::Level::Info, format!("(output) {}", String::from_utf8_lossy(output).trim_end())));
        }
        if data.dropped_logs > 0 {
            logs.push((sdk::Level::Warn, format!("({} more log lines dropped)", data.dropped_logs)));
        }
        let output_len = output.len();
        // Each instance serves one call; freeing it is left to the background thread.
        self.runtime.background(Job::Discard(Box::new(w)));
        // A guest whose output was cut off usually panics on the failed write: name the cause.
        let output_full = output_len * 10 > limits.output_bytes * 9;
        let value = match result {
            Ok(v) => v,
            Err(e) => {
                let mut f = match classify(&e, limits) {
                    f if output_full && f.kind == FailureKind::Trap => CallFailure::new(
                        FailureKind::Output,
                        format!("wrote more than {} bytes of output ({})", limits.output_bytes, f.message),
                    ),
                    f => f,
                };
                f.logs = logs;
                return Err(f);
            }
        };
        let stats = CallStats { fuel, micros: start.elapsed().as_micros() as u64, cpu_micros, warm: was_warm };
        Ok(Called { value, stats, logs })
    }

    /// Calls `route`.
    pub fn route(self: &Arc<Self>, request: &sdk::RequestInfo) -> Result<Called<sdk::RouteDecision>, CallFailure> {
        let wit_request = wit::RequestInfo::from(request);
        let c = self.call(request, |exports, store, instance| match exports {
            Exports::Router(ix) => ix.load(&mut *store, instance)?.call_route(&mut *store, &wit_request),
            _ => Err(wasmtime::Error::msg("not a router")),
        })?;
        Ok(Called { value: c.value.into(), stats: c.stats, logs: c.logs })
    }

    /// Calls `price`.
    pub fn price(
        self: &Arc<Self>,
        request: &sdk::RequestInfo,
        usage: &sdk::Usage,
    ) -> Result<Called<sdk::Money>, CallFailure> {
        let (wit_request, wit_usage) = (wit::RequestInfo::from(request), wit::Usage::from(usage));
        let c = self.call(request, |exports, store, instance| match exports {
            Exports::Pricer(ix) => ix.load(&mut *store, instance)?.call_price(&mut *store, &wit_request, wit_usage),
            _ => Err(wasmtime::Error::msg("not a pricer")),
        })?;
        let money = c.value.map_err(|e| CallFailure::new(FailureKind::Declined, e))?;
        Ok(Called { value: money.into(), stats: c.stats, logs: c.logs })
    }

    /// Calls `attribute`.
    pub fn attribute(
        self: &Arc<Self>,
        request: &sdk::RequestInfo,
        usage: &sdk::Usage,
        charge: &sdk::Money,
    ) -> Result<Called<Vec<sdk::Split>>, CallFailure> {
        let (wit_request, wit_usage, wit_charge) =
            (wit::RequestInfo::from(request), wit::Usage::from(usage), wit::Money::from(charge));
        let c = self.call(request, |exports, store, instance| match exports {
            Exports::Attributor(ix) => {
                ix.load(&mut *store, instance)?.call_attribute(&mut *store, &wit_request, wit_usage, &wit_charge)
            }
            _ => Err(wasmtime::Error::msg("not an attributor")),
        })?;
        let splits = c.value.map_err(|e| CallFailure::new(FailureKind::Declined, e))?;
        Ok(Called { value: splits.into_iter().map(Into::into).collect(), stats: c.stats, logs: c.logs })
    }
}

impl WarmPool for CompiledPlugin {
    fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    fn warm_len(&self) -> usize {
        self.lock_warm().len()
    }

    fn empty_pool(&self) {
        let emptied = std::mem::take(&mut *self.lock_warm());
        self.runtime.warm.release(emptied.len());
    }
}

impl Drop for CompiledPlugin {
    fn drop(&mut self) {
        self.empty_pool();
    }
}

/// A call's value with its cost and the log lines it wrote.
#[derive(Debug)]
pub struct Called<T> {
    /// What the plugin returned.
    pub value: T,
    /// Fuel and time.
    pub stats: CallStats,
    /// Log lines (`host.log`, then captured stdout/stderr).
    pub logs: Vec<(sdk::Level, String)>,
}

/// Names what stopped a call, from wasmtime's error.
/// Most bytes a plugin may hand the host in one call or one result (strings and lists
/// together): room for [`openlora_sdk::money::MAX_SPLITS`] splits with long reasons.
pub(crate) const MAX_HOSTCALL_BYTES: usize = 256 << 10;

fn classify(e: &wasmtime::Error, limits: &super::config::PolicyConfig) -> CallFailure {
    if let Some(r) = e.downcast_ref::<RandomLimit>() {
        return CallFailure::new(FailureKind::Trap, format!("trapped: {r}"));
    }
    if let Some(trap) = e.downcast_ref::<Trap>() {
        return match trap {
            Trap::OutOfFuel => CallFailure::new(FailureKind::Fuel, format!("used all its fuel ({})", limits.fuel)),
            Trap::Interrupt => {
                CallFailure::new(FailureKind::Deadline, format!("ran past its deadline of {} ms", limits.deadline_ms))
            }
            Trap::StackOverflow => {
                CallFailure::new(FailureKind::Stack, format!("overflowed its stack of {} bytes", limits.stack_bytes))
            }
            other => CallFailure::new(FailureKind::Trap, format!("trapped: {other}")),
        };
    }
    let text = format!("{e:#}");
    if text.contains("forcing trap when growing memory") || text.contains("memory minimum size") {
        CallFailure::new(FailureKind::Memory, format!("went over its memory cap of {} bytes", limits.memory_bytes))
    } else if text.contains("fuel allocated for hostcalls") {
        CallFailure::new(FailureKind::Invalid, format!("handed the host more than {MAX_HOSTCALL_BYTES} bytes at once"))
    } else if text.contains("write beyond capacity") {
        CallFailure::new(FailureKind::Output, format!("wrote more than {} bytes of output", limits.output_bytes))
    } else {
        CallFailure::new(FailureKind::Trap, text)
    }
}
