//! What a plugin runs inside: the host bindings of `openlora:policy`, the per-store state, and a
//! WASI environment that is empty and deterministic (no files, network, environment or
//! arguments; randomness seeded from the request id, bounded per call).
//!
//! **Time is virtual.** The wall clock reads the request's arrival time plus the virtual time
//! elapsed in the call; the monotonic clock starts at 0 each call and only the host advances
//! it: waiting on a timer (`sleep`, `subscribe-duration`, `subscribe-instant`) moves virtual
//! time to the timer's deadline at once. No host call a plugin can make blocks or reads real
//! time, so a call's fuel and deadline bound everything it does, and a replay observes exactly
//! what the first run observed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::StoreLimits;
use wasmtime::component::{HasSelf, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::bindings::random::{insecure as wasi_insecure, random as wasi_random};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

use openlora_sdk as sdk;

use super::deadline::CallClock;

wasmtime::component::bindgen!({
    path: "../wit",
    inline: "
        package openlora:host;

        /// Everything the host may call: each plugin exports one of these three interfaces.
        world plugins {
            import openlora:policy/host@0.1.0;
            export openlora:policy/routing@0.1.0;
            export openlora:policy/pricing@0.1.0;
            export openlora:policy/attribution@0.1.0;
        }
    ",
    world: "plugins",
});

pub(crate) use exports::openlora::policy::{attribution, pricing, routing};
use openlora::policy::host::Level;
pub(crate) use openlora::policy::types as wit;

/// Most log lines one call may write; the rest are counted, not kept.
const MAX_LOG_LINES: usize = 32;

/// Longest log line kept, in bytes.
const MAX_LOG_LINE_BYTES: usize = 1024;

/// Most random bytes one host call may ask for.
pub(crate) const MAX_RANDOM_PER_HOSTCALL: u64 = 4 << 10;

/// Most random bytes one plugin call may use in all.
pub(crate) const MAX_RANDOM_PER_CALL: u64 = 64 << 10;

/// The error a plugin gets (as a trap) for asking more randomness than the sandbox gives.
#[derive(Debug, thiserror::Error)]
#[error(
    "asked for {asked} random bytes; a call may use {MAX_RANDOM_PER_HOSTCALL} at once and {MAX_RANDOM_PER_CALL} in all"
)]
pub(crate) struct RandomLimit {
    asked: u64,
}

/// The state of one store: WASI (empty), resource table, limits and captured output.
pub(crate) struct Sandbox {
    wasi: WasiCtx,
    table: ResourceTable,
    /// Memory and instance caps enforced by wasmtime.
    pub(crate) limits: StoreLimits,
    /// Log lines written through `host.log` during the current call.
    pub(crate) logs: Vec<(sdk::Level, String)>,
    /// Log lines dropped for exceeding [`MAX_LOG_LINES`].
    pub(crate) dropped_logs: usize,
    /// The guest's stdout and stderr, bounded.
    pub(crate) output: MemoryOutputPipe,
    /// Bytes of `output` written before the current call (by configuration).
    pub(crate) output_before_call: usize,
    /// The current call's request time (ms since the epoch): the wall clock's origin.
    clock_ms: Arc<AtomicU64>,
    /// Virtual nanoseconds elapsed in the current call: the monotonic clock.
    virtual_ns: Arc<AtomicU64>,
    rng: SeededRng,
    /// Random bytes handed out in the current call.
    random_used: u64,
    /// When the current call (or configuration) started: what its deadline is judged by.
    pub(crate) clock: CallClock,
}

impl Sandbox {
    /// A store state whose clock and randomness are set for configuration (before any request is
    /// known): time zero, randomness seeded from the plugin's sha256.
    pub(crate) fn new(limits: StoreLimits, output_bytes: usize, plugin_sha: &str) -> Self {
        let output = MemoryOutputPipe::new(output_bytes);
        let clock_ms = Arc::new(AtomicU64::new(0));
        let virtual_ns = Arc::new(AtomicU64::new(0));
        let insecure_seed = u128::from_le_bytes(digest(plugin_sha.as_bytes())[..16].try_into().unwrap_or([0; 16]));
        let mut b = WasiCtx::builder();
        // WASI's own random sources are shadowed in the linker; these only keep them empty.
        b.stdout(output.clone())
            .stderr(output.clone())
            .wall_clock(VirtualWallClock { origin_ms: clock_ms.clone(), elapsed_ns: virtual_ns.clone() })
            .monotonic_clock(VirtualMonotonicClock(virtual_ns.clone()))
            .max_random_size(MAX_RANDOM_PER_HOSTCALL)
            .insecure_random_seed(insecure_seed)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        Sandbox {
            wasi: b.build(),
            table: ResourceTable::new(),
            limits,
            logs: Vec::new(),
            dropped_logs: 0,
            output,
            output_before_call: 0,
            clock_ms,
            virtual_ns,
            rng: SeededRng::new(&format!("configure:{plugin_sha}")),
            random_used: 0,
            clock: CallClock::start(),
        }
    }

    /// Sets the clocks to `received_at_ms` and virtual time 0, and seeds randomness from
    /// `request_id`, for one call: what the call observes depends on nothing else.
    pub(crate) fn prepare_call(&mut self, received_at_ms: u64, request_id: &str) {
        self.clock_ms.store(received_at_ms, Ordering::Relaxed);
        self.virtual_ns.store(0, Ordering::Relaxed);
        self.rng = SeededRng::new(request_id);
        self.random_used = 0;
        self.output_before_call = self.output.contents().len();
    }

    /// A timer on the virtual clock, due at `at_ns`.
    fn timer(&mut self, at_ns: u64) -> wasmtime::Result<Resource<DynPollable>> {
        let timer = self.table.push(VirtualTimer { at_ns, clock: self.virtual_ns.clone() })?;
        Ok(subscribe(&mut self.table, timer)?)
    }

    /// `len` random bytes from the call's seeded generator, refused (a trap) before anything
    /// is allocated when over the per-hostcall or per-call limit.
    fn random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        if len > MAX_RANDOM_PER_HOSTCALL || self.random_used.saturating_add(len) > MAX_RANDOM_PER_CALL {
            return Err(wasmtime::Error::new(RandomLimit { asked: len }));
        }
        self.random_used += len;
        let mut buf = vec![0u8; len as usize];
        for chunk in buf.chunks_mut(8) {
            chunk.copy_from_slice(&self.rng.next().to_le_bytes()[..chunk.len()]);
        }
        Ok(buf)
    }

    fn random_u64(&mut self) -> wasmtime::Result<u64> {
        let b = self.random_bytes(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
}

impl WasiView for Sandbox {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl openlora::policy::host::Host for Sandbox {
    fn log(&mut self, level: Level, message: String) {
        if self.logs.len() >= MAX_LOG_LINES {
            self.dropped_logs += 1;
            return;
        }
        let message = super::log::cap(message, MAX_LOG_LINE_BYTES);
        let level = match level {
            Level::Debug => sdk::Level::Debug,
            Level::Info => sdk::Level::Info,
            Level::Warn => sdk::Level::Warn,
            Level::Error => sdk::Level::Error,
        };
        self.logs.push((level, message));
    }
}

impl openlora::policy::types::Host for Sandbox {}

/// The wall clock: the request's arrival time plus the call's virtual elapsed time.
struct VirtualWallClock {
    origin_ms: Arc<AtomicU64>,
    elapsed_ns: Arc<AtomicU64>,
}

impl HostWallClock for VirtualWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }
    fn now(&self) -> Duration {
        Duration::from_millis(self.origin_ms.load(Ordering::Relaxed))
            + Duration::from_nanos(self.elapsed_ns.load(Ordering::Relaxed))
    }
}

/// The monotonic clock: the call's virtual nanoseconds, which only timers advance.
struct VirtualMonotonicClock(Arc<AtomicU64>);

impl HostMonotonicClock for VirtualMonotonicClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A timer on the virtual clock: waiting on it (`block`, `poll` or `ready`) moves virtual time
/// to its deadline at once, so it never blocks and never reads real time.
struct VirtualTimer {
    at_ns: u64,
    clock: Arc<AtomicU64>,
}

#[wasmtime_wasi::async_trait]
impl Pollable for VirtualTimer {
    async fn ready(&mut self) {
        self.clock.fetch_max(self.at_ns, Ordering::Relaxed);
    }
}

impl monotonic_clock::Host for Sandbox {
    fn now(&mut self) -> wasmtime::Result<u64> {
        Ok(self.virtual_ns.load(Ordering::Relaxed))
    }
    fn resolution(&mut self) -> wasmtime::Result<u64> {
        Ok(1)
    }
    fn subscribe_instant(&mut self, when: u64) -> wasmtime::Result<Resource<DynPollable>> {
        self.timer(when)
    }
    fn subscribe_duration(&mut self, duration: u64) -> wasmtime::Result<Resource<DynPollable>> {
        let at = self.virtual_ns.load(Ordering::Relaxed).saturating_add(duration);
        self.timer(at)
    }
}

impl wasi_random::Host for Sandbox {
    fn get_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.random_bytes(len)
    }
    fn get_random_u64(&mut self) -> wasmtime::Result<u64> {
        self.random_u64()
    }
}

impl wasi_insecure::Host for Sandbox {
    fn get_insecure_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.random_bytes(len)
    }
    fn get_insecure_random_u64(&mut self) -> wasmtime::Result<u64> {
        self.random_u64()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// xoshiro256** seeded from the sha256 of a seed string: deterministic, not cryptographic
/// (plugins need replayable decisions, not secrets).
pub(crate) struct SeededRng([u64; 4]);

impl SeededRng {
    fn new(seed: &str) -> Self {
        let d = digest(seed.as_bytes());
        let mut s = [0u64; 4];
        for (i, chunk) in d.chunks_exact(8).enumerate() {
            s[i] = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8])) | 1;
        }
        SeededRng(s)
    }

    fn next(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
}

/// The linker every plugin is instantiated with: `host.log` plus WASI (whose filesystem and
/// sockets parts exist only to be refused at validation; the context grants nothing anyway),
/// with the interfaces that touch time or entropy replaced by the sandbox's own: the virtual
/// monotonic clock and its timers, and the bounded, seeded random sources.
pub(crate) fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<Sandbox>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    openlora::policy::host::add_to_linker::<Sandbox, HasSelf<Sandbox>>(&mut linker, |s| s)?;
    linker.allow_shadowing(true);
    monotonic_clock::add_to_linker::<Sandbox, HasSelf<Sandbox>>(&mut linker, |s| s)?;
    wasi_random::add_to_linker::<Sandbox, HasSelf<Sandbox>>(&mut linker, |s| s)?;
    wasi_insecure::add_to_linker::<Sandbox, HasSelf<Sandbox>>(&mut linker, |s| s)?;
    linker.allow_shadowing(false);
    Ok(linker)
}

/// Interfaces a plugin may import (version left off): the policy host and the harmless WASI
/// parts a Rust `std` guest imports even when unused.
pub(crate) const ALLOWED_IMPORTS: &[&str] = &[
    "openlora:policy/host",
    "openlora:policy/types",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:io/poll",
    "wasi:io/error",
    "wasi:io/streams",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
];

// Conversions between the host bindings' types and the SDK's plain types.

impl From<&sdk::RequestInfo> for wit::RequestInfo {
    fn from(r: &sdk::RequestInfo) -> Self {
        wit::RequestInfo {
            request_id: r.request_id.clone(),
            tenant: r.tenant.clone(),
            requested_model: r.requested_model.clone(),
            adapter: r.adapter.clone(),
            adapter_owner: r.adapter_owner.clone(),
            prompt_tokens: r.prompt_tokens,
            max_tokens: r.max_tokens,
            metadata: r.metadata.iter().map(|(k, v)| wit::KeyValue { key: k.clone(), value: v.clone() }).collect(),
            received_at_ms: r.received_at_ms,
        }
    }
}

impl From<&sdk::Usage> for wit::Usage {
    fn from(u: &sdk::Usage) -> Self {
        wit::Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            queue_ms: u.queue_ms,
            compute_ms: u.compute_ms,
            adapter_load_ms: u.adapter_load_ms,
            steps: u.steps,
            batch_share_ppm: u.batch_share_ppm,
            adapter_contribution_ppm: u.adapter_contribution_ppm,
        }
    }
}

impl From<&sdk::Money> for wit::Money {
    fn from(m: &sdk::Money) -> Self {
        wit::Money { amount: m.amount, currency: m.currency.clone() }
    }
}

impl From<wit::Money> for sdk::Money {
    fn from(m: wit::Money) -> Self {
        sdk::Money { amount: m.amount, currency: m.currency }
    }
}

impl From<wit::Split> for sdk::Split {
    fn from(s: wit::Split) -> Self {
        sdk::Split { payee: s.payee, amount: s.amount, reason: s.reason }
    }
}

impl From<wit::RouteDecision> for sdk::RouteDecision {
    fn from(d: wit::RouteDecision) -> Self {
        match d {
            wit::RouteDecision::Serve(r) => {
                sdk::RouteDecision::Serve(sdk::Route { adapter: r.adapter, priority: r.priority })
            }
            wit::RouteDecision::Reject(reason) => sdk::RouteDecision::Reject(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox() -> Sandbox {
        Sandbox::new(wasmtime::StoreLimitsBuilder::new().build(), 1024, "sha")
    }

    #[test]
    fn randomness_is_bounded_per_host_call_and_per_call_and_refused_before_allocating() {
        let mut s = sandbox();
        s.prepare_call(1, "req-1");
        let cpu = || crate::policy::deadline::thread_cpu_time().expect("this thread's CPU clock");
        let start = cpu();
        let e = s.random_bytes(64 << 20).expect_err("64 MiB at once is refused");
        assert!(e.downcast_ref::<RandomLimit>().is_some(), "{e}");
        let used = cpu() - start;
        assert!(used < Duration::from_millis(5), "refused without work: {used:?} of CPU time");
        for _ in 0..MAX_RANDOM_PER_CALL / MAX_RANDOM_PER_HOSTCALL {
            assert_eq!(s.random_bytes(MAX_RANDOM_PER_HOSTCALL).expect("within the limits").len(), 4096);
        }
        assert!(s.random_bytes(1).is_err(), "the call's total is spent");
        s.prepare_call(1, "req-2");
        assert!(s.random_bytes(8).is_ok(), "a new call starts afresh");
    }

    #[test]
    fn randomness_and_time_depend_only_on_the_request() {
        let (mut a, mut b) = (sandbox(), sandbox());
        a.prepare_call(5, "same");
        b.prepare_call(5, "same");
        assert_eq!(a.random_bytes(100).unwrap(), b.random_bytes(100).unwrap());
        b.prepare_call(5, "other");
        assert_ne!(a.random_bytes(100).unwrap(), b.random_bytes(100).unwrap());
        // Timers move virtual time, not real time.
        let t = a.virtual_ns.load(Ordering::Relaxed);
        let _ = monotonic_clock::Host::subscribe_duration(&mut a, 3_000_000_000).unwrap();
        assert_eq!(monotonic_clock::Host::now(&mut a).unwrap(), t, "subscribing alone does not move time");
        let wall = VirtualWallClock { origin_ms: a.clock_ms.clone(), elapsed_ns: a.virtual_ns.clone() };
        assert_eq!(wall.now(), Duration::from_millis(5));
    }
}
