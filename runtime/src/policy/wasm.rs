//! The wasmtime side: one engine (pooling allocator, fuel, epochs), upload validation, a compile
//! cache on disk, and the epoch ticker that wakes every call's deadline check.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::config::PolicyConfig;
use super::sandbox::{ALLOWED_IMPORTS, Sandbox, linker};
use super::slot::World;
use super::warm::{SWEEP_EVERY, WarmBudget, WarmPool};
use crate::error::{Error, PolicyError, Result};

/// Milliseconds per epoch tick: the granularity of call deadlines.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Most component instances alive at once: warm pools (`policy.warm_instances_total`), calls
/// in flight (at most `limits.max_concurrent_requests`), installs and instances being dropped.
const MAX_INSTANCES: u32 = 1200;

/// Compiled components kept in memory by sha256, so that many slots running one component
/// (thousands of adapters with the same attributor) share its code.
const MAX_COMPONENTS_IN_MEMORY: usize = 64;

/// The hex sha256 of `bytes`: the name of a plugin version everywhere.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 (hex) a configuration is recorded by; `None` for no configuration.
pub fn config_sha256(config: &str) -> Option<String> {
    (!config.is_empty()).then(|| sha256_hex(config.as_bytes()))
}

/// Work done off the request path by the runtime's background thread.
pub(crate) enum Job {
    /// Top up a plugin's pool of warm instances.
    Refill(Box<dyn FnOnce() + Send>),
    /// Drop a used instance (returning its memory to the pool takes time).
    Discard(Box<dyn Send>),
}

/// The engine, linker and limits every plugin shares.
pub struct WasmRuntime {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<Sandbox>,
    pub(crate) limits: PolicyConfig,
    cache_dir: Option<PathBuf>,
    stop_ticker: Arc<AtomicBool>,
    jobs: Sender<Job>,
    /// Used instances waiting to be dropped by the background thread.
    discards_pending: Arc<AtomicUsize>,
    /// The server-wide budget of warm instances.
    pub(crate) warm: Arc<WarmBudget>,
    /// Recently compiled components by sha256, most recent last.
    components: Mutex<Vec<(String, Component)>>,
}

/// Used instances the background thread may have waiting; beyond this callers drop their own.
const MAX_PENDING_DISCARDS: usize = 64;

impl WasmRuntime {
    /// Builds the engine with `limits`; compiled plugins are cached under `cache_dir` if given.
    pub fn new(limits: &PolicyConfig, cache_dir: Option<PathBuf>) -> Result<Arc<Self>> {
        let mut pool = PoolingAllocationConfig::default();
        let memory = limits.memory_bytes.next_multiple_of(64 << 10);
        pool.total_component_instances(MAX_INSTANCES)
            .total_core_instances(MAX_INSTANCES * 4)
            .total_memories(MAX_INSTANCES * 2)
            .total_tables(MAX_INSTANCES * 4)
            .max_memory_size(memory)
            .max_memories_per_component(4)
            .max_tables_per_component(8)
            .table_elements(20_000)
            .max_component_instance_size(1 << 20)
            .max_core_instance_size(1 << 20);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(limits.stack_bytes)
            .memory_reservation(memory as u64)
            .memory_guard_size(64 << 10)
            .memory_reservation_for_growth(0)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| wasm_error("engine", e))?;
        let linker = linker(&engine).map_err(|e| wasm_error("linker", e))?;
        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (ticker_engine, stop) = (engine.clone(), stop_ticker.clone());
        std::thread::Builder::new()
            .name("openlora-plugin-epoch".into())
            .spawn(move || {
                // Ticks follow the real clock, not the count of sleeps (each oversleeps a little,
                // more on a busy machine): a late wake-up catches up.
                let start = std::time::Instant::now();
                let mut ticks: u128 = 0;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    let due = start.elapsed().as_micros() / EPOCH_TICK.as_micros();
                    while ticks < due {
                        ticker_engine.increment_epoch();
                        ticks += 1;
                    }
                }
            })
            .map_err(|e| Error::io("plugin epoch thread", e))?;
        let (jobs, queue) = channel::<Job>();
        let discards_pending = Arc::new(AtomicUsize::new(0));
        let pending = discards_pending.clone();
        let warm = Arc::new(WarmBudget::new(limits.warm_instances_total));
        let sweeper = warm.clone();
        std::thread::Builder::new()
            .name("openlora-plugin-warm".into())
            .spawn(move || {
                // Ends when the runtime (the only sender) is dropped.
                loop {
                    match queue.recv_timeout(SWEEP_EVERY) {
                        Ok(Job::Refill(refill)) => refill(),
                        Ok(Job::Discard(used)) => {
                            drop(used);
                            pending.fetch_sub(1, Ordering::Relaxed);
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    sweeper.sweep_if_due();
                }
            })
            .map_err(|e| Error::io("plugin warm-pool thread", e))?;
        Ok(Arc::new(WasmRuntime {
            engine,
            linker,
            limits: limits.clone(),
            cache_dir,
            stop_ticker,
            jobs,
            discards_pending,
            warm,
            components: Mutex::new(Vec::new()),
        }))
    }

    /// Registers a plugin's warm pool with the server-wide budget.
    pub(crate) fn track_pool(&self, pool: Weak<dyn WarmPool>) {
        self.warm.track(pool);
    }

    /// Hands work to the background thread (done inline if that thread is gone).
    pub(crate) fn background(&self, job: Job) {
        if let Job::Discard(_) = &job {
            if self.discards_pending.load(Ordering::Relaxed) >= MAX_PENDING_DISCARDS {
                return drop(job);
            }
            self.discards_pending.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(std::sync::mpsc::SendError(job)) = self.jobs.send(job) {
            match job {
                Job::Refill(refill) => refill(),
                Job::Discard(used) => {
                    drop(used);
                    self.discards_pending.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Epoch ticks a call may run before its deadline is first checked.
    pub(crate) fn deadline_ticks(&self) -> u64 {
        super::deadline::ticks(Duration::from_millis(self.limits.deadline_ms), EPOCH_TICK)
    }

    /// The world a component exports (the first of router, pricer, attributor it has), checking
    /// its header and compiling it.
    pub fn detect_world(&self, what: &str, bytes: &[u8]) -> Result<World> {
        let invalid = |message: String| Error::from(PolicyError::PluginInvalid { what: what.to_string(), message });
        check_header(bytes).map_err(invalid)?;
        let component =
            self.compile(&sha256_hex(bytes), bytes).map_err(|e| invalid(format!("does not compile: {e:#}")))?;
        let ty = component.component_type();
        let exports: Vec<String> = ty.exports(&self.engine).map(|(n, _)| n.to_string()).collect();
        [World::Router, World::Pricer, World::Attributor]
            .into_iter()
            .find(|w| exports.iter().any(|e| e == w.export_name()))
            .ok_or_else(|| {
                invalid(format!("exports none of the openlora:policy interfaces (it exports: {})", exports.join(", ")))
            })
    }

    /// The interfaces a component imports.
    pub fn imports(&self, bytes: &[u8]) -> Vec<String> {
        match self.compile(&sha256_hex(bytes), bytes) {
            Ok(c) => c.component_type().imports(&self.engine).map(|(n, _)| n.to_string()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The cache file of the component with this sha256.
    fn cached_path(dir: &Path, sha: &str) -> PathBuf {
        dir.join(format!("{sha}-wasmtime-{}.cwasm", wasmtime_version()))
    }

    /// Compiles a component, or loads it from the on-disk cache keyed by sha256 and wasmtime
    /// version (a hit marks the file as just used). Nothing is written: only a component that
    /// passed every check is kept ([`WasmRuntime::remember`]).
    pub(crate) fn compile(&self, sha: &str, bytes: &[u8]) -> wasmtime::Result<Component> {
        if let Some(component) = self.in_memory(sha) {
            return Ok(component);
        }
        if let Some(dir) = &self.cache_dir {
            let path = Self::cached_path(dir, sha);
            if path.is_file() {
                // SAFETY: files in the cache directory are written only by `remember` below,
                // named by the sha256 of the source they were compiled from and by wasmtime's
                // version; the engine also checks its own compatibility stamp and refuses a
                // mismatched artifact.
                if let Ok(c) = unsafe { Component::deserialize_file(&self.engine, &path) } {
                    let _ = std::fs::File::options()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                    return Ok(c);
                }
            }
        }
        Component::from_binary(&self.engine, bytes)
    }

    /// An accepted component compiled recently, marked as just used.
    fn in_memory(&self, sha: &str) -> Option<Component> {
        let mut kept = self.components.lock().unwrap_or_else(|p| p.into_inner());
        let at = kept.iter().position(|(s, _)| s == sha)?;
        let hit = kept.remove(at);
        let component = hit.1.clone();
        kept.push(hit);
        Some(component)
    }

    /// Keeps an accepted component's compiled form in memory and in the cache, then trims the cache to
    /// [`MAX_CACHE_BYTES`], least recently used first.
    pub(crate) fn remember(&self, sha: &str, component: &Component) {
        {
            let mut kept = self.components.lock().unwrap_or_else(|p| p.into_inner());
            kept.retain(|(s, _)| s != sha);
            kept.push((sha.to_string(), component.clone()));
            if kept.len() > MAX_COMPONENTS_IN_MEMORY {
                kept.remove(0);
            }
        }
        let Some(dir) = &self.cache_dir else { return };
        let path = Self::cached_path(dir, sha);
        if !path.is_file()
            && let Ok(serialized) = component.serialize()
        {
            let _ = write_atomically(dir, &path, &serialized);
        }
        trim_cache(dir, MAX_CACHE_BYTES);
    }
}

impl Drop for WasmRuntime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// The most bytes of compiled plugins kept on disk.
pub(crate) const MAX_CACHE_BYTES: u64 = 512 << 20;

/// Removes the least recently used compiled plugins until the cache holds at most `max` bytes.
pub(crate) fn trim_cache(dir: &Path, max: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= max {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}

/// The wasmtime version compiled in (part of the compile cache's key).
fn wasmtime_version() -> &'static str {
    "48.0.8"
}

fn wasm_error(what: &str, e: wasmtime::Error) -> Error {
    Error::from(PolicyError::PluginInvalid { what: what.to_string(), message: format!("{e:#}") })
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see half a file.
pub(crate) fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Refuses what is not a wasm component before handing it to the compiler, with a useful message.
pub(crate) fn check_header(bytes: &[u8]) -> std::result::Result<(), String> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err("not a WebAssembly file (no `\\0asm` header; truncated or another format?)".into());
    }
    // Bytes 4..8: version 1 + layer 0 is a core module; a component has layer 1.
    if bytes[6..8] == [0, 0] {
        return Err("a core wasm module, not a component: build with `--target wasm32-wasip2` \
                    (or wrap it with `wasm-tools component new`)"
            .into());
    }
    Ok(())
}

/// Checks the component exports `world`'s interface and imports nothing outside the allow-list.
pub(crate) fn check_imports_exports(
    engine: &Engine,
    component: &Component,
    world: World,
) -> std::result::Result<(), String> {
    let ty = component.component_type();
    let mut forbidden = Vec::new();
    for (name, _) in ty.imports(engine) {
        let unversioned = name.split('@').next().unwrap_or(name);
        if !ALLOWED_IMPORTS.contains(&unversioned) {
            forbidden.push(name.to_string());
        }
    }
    if !forbidden.is_empty() {
        return Err(format!(
            "imports {} — a plugin may import only openlora:policy/host and the empty, deterministic \
             WASI parts a Rust std guest needs (no filesystem, sockets, http or other host functions)",
            forbidden.join(", ")
        ));
    }
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    if !exports.iter().any(|e| e == world.export_name()) {
        return Err(format!(
            "does not export {} (it exports: {}); is it a {} plugin built with openlora-sdk's `{}` feature?",
            world.export_name(),
            if exports.is_empty() { "nothing".to_string() } else { exports.join(", ") },
            world.name(),
            world.name()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compile_cache_keeps_the_most_recently_used_within_its_bytes() {
        let dir = std::env::temp_dir().join(format!("openlora-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
        for (i, name) in ["old", "middle", "new"].iter().enumerate() {
            let path = dir.join(format!("{name}.cwasm"));
            std::fs::write(&path, vec![0u8; 1000]).unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(10 * i as u64)).unwrap();
        }
        std::fs::write(dir.join("state.json"), b"{}").unwrap();
        trim_cache(&dir, 2000);
        let mut left: Vec<String> =
            std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["middle.cwasm", "new.cwasm", "state.json"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn headers_are_checked_before_compiling() {
        assert!(check_header(b"").unwrap_err().contains("not a WebAssembly"));
        assert!(check_header(b"\0asm\x01\0\0\0").unwrap_err().contains("core wasm module"));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }
}
