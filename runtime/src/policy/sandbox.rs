//! What a plugin runs inside: the host bindings of `openlora:policy`, the per-store state, and a
//! WASI environment that is empty and deterministic (no files, network, environment or
//! arguments; clocks fixed to the request's time; randomness seeded from the request id).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand_core::TryRng;
use sha2::{Digest, Sha256};
use wasmtime::StoreLimits;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

use openlora_sdk as sdk;

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
    clock_ms: Arc<AtomicU64>,
    rng: Arc<Mutex<SeededRng>>,
}

impl Sandbox {
    /// A store state whose clock and randomness are set for configuration (before any request is
    /// known): time zero, randomness seeded from the plugin's sha256.
    pub(crate) fn new(limits: StoreLimits, output_bytes: usize, plugin_sha: &str) -> Self {
        let output = MemoryOutputPipe::new(output_bytes);
        let clock_ms = Arc::new(AtomicU64::new(0));
        let rng = Arc::new(Mutex::new(SeededRng::new(&format!("configure:{plugin_sha}"))));
        let insecure_seed = u128::from_le_bytes(digest(plugin_sha.as_bytes())[..16].try_into().unwrap_or([0; 16]));
        let mut b = WasiCtx::builder();
        b.stdout(output.clone())
            .stderr(output.clone())
            .wall_clock(FixedWallClock(clock_ms.clone()))
            .monotonic_clock(FixedMonotonicClock)
            .secure_random(SharedRng(rng.clone()))
            .insecure_random(SharedRng(rng.clone()))
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
            rng,
        }
    }

    /// Fixes the clock to `received_at_ms` and seeds randomness from `request_id` for one call.
    pub(crate) fn prepare_call(&mut self, received_at_ms: u64, request_id: &str) {
        self.clock_ms.store(received_at_ms, Ordering::Relaxed);
        *self.rng.lock().unwrap_or_else(|p| p.into_inner()) = SeededRng::new(request_id);
        self.output_before_call = self.output.contents().len();
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
        let mut message = message;
        if message.len() > MAX_LOG_LINE_BYTES {
            let mut cut = MAX_LOG_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
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

/// A wall clock stopped at the current call's request time.
struct FixedWallClock(Arc<AtomicU64>);

impl HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }
    fn now(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

/// A monotonic clock that never advances.
struct FixedMonotonicClock;

impl HostMonotonicClock for FixedMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }
    fn now(&self) -> u64 {
        0
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

/// The store's generator, shared by WASI's random interfaces and reseeded per call.
struct SharedRng(Arc<Mutex<SeededRng>>);

impl TryRng for SharedRng {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok((self.try_next_u64()? >> 32) as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).next())
    }
    fn try_fill_bytes(&mut self, buf: &mut [u8]) -> Result<(), Infallible> {
        let mut rng = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for chunk in buf.chunks_mut(8) {
            let v = rng.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }
}

/// The linker every plugin is instantiated with: `host.log` plus WASI (whose filesystem and
/// sockets parts exist only to be refused at validation; the context grants nothing anyway).
pub(crate) fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<Sandbox>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    openlora::policy::host::add_to_linker::<Sandbox, HasSelf<Sandbox>>(&mut linker, |s| s)?;
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
