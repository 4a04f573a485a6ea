//! The adapter pager: registered on disk → host RAM cache (LRU by bytes) → active page pool.
//!
//! S-LoRA's design on three tiers. Adapters in use are *leased*: a lease pins the adapter in
//! the active pool until dropped, so nothing a running batch reads is ever evicted. Loads from
//! disk of the same adapter are coalesced into one; [`AdapterPager::prefetch`] warms the host
//! tier in the background for requests still waiting; a corrupt or vanished adapter file fails
//! only the requests that need that adapter.

pub mod pool;

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, Weak};
use std::time::{Duration, Instant};

use crate::adapters::{AdapterManifest, LoraWeights};
use crate::error::{Error, Result, SubmitError};
use crate::metrics::PagerMetrics;
use crate::shape::ModelConfig;
pub use pool::PoolPlace;
use pool::{PageAllocator, PoolData, ResidentAdapter};

/// Capacities of the pager's tiers, in bytes.
#[derive(Debug, Clone)]
pub struct PagerConfig {
    /// Host RAM cache of loaded adapters.
    pub host_cache_bytes: usize,
    /// The active page pool the LoRA op reads from.
    pub active_pool_bytes: usize,
    /// Values per page; 0 means the base model's hidden size, as in S-LoRA.
    pub page_elems: usize,
    /// Where the pool's values live: a host arena of f32 (or bf16, serving in bf16), or a GPU's
    /// bf16 mirror (`active_pool_bytes` is then device memory, and the host keeps no copy).
    pub pool: PoolPlace,
}

impl Default for PagerConfig {
    fn default() -> Self {
        PagerConfig { host_cache_bytes: 1 << 30, active_pool_bytes: 256 << 20, page_elems: 0, pool: PoolPlace::Host }
    }
}

struct HostEntry {
    weights: Arc<LoraWeights>,
    manifest: Arc<AdapterManifest>,
    last_used: u64,
}

struct ActiveEntry {
    resident: Arc<ResidentAdapter>,
    manifest: Arc<AdapterManifest>,
    pins: usize,
    last_used: u64,
}

/// A disk load in flight, which other requests for the same adapter wait on.
#[derive(Default)]
struct LoadWait {
    done: Mutex<Option<Result<Arc<LoraWeights>, Arc<Error>>>>,
    cv: Condvar,
}

struct State {
    registry: HashMap<String, Arc<AdapterManifest>>,
    host: HashMap<String, HostEntry>,
    host_bytes: usize,
    active: HashMap<String, ActiveEntry>,
    alloc: PageAllocator,
    loading: HashMap<String, Arc<LoadWait>>,
    /// The last failed disk load of each name: that version, why, and when.
    failed: HashMap<String, (Arc<AdapterManifest>, Arc<Error>, Instant)>,
    /// The version of each name waiting for the background loader (sent once).
    queued: HashMap<String, Arc<AdapterManifest>>,
    clock: u64,
}

impl State {
    /// Whether this version of `name` is in host memory or the active pool.
    fn in_memory(&self, name: &str, manifest: &Arc<AdapterManifest>) -> bool {
        self.active.get(name).is_some_and(|a| Arc::ptr_eq(&a.manifest, manifest))
            || self.host.get(name).is_some_and(|h| Arc::ptr_eq(&h.manifest, manifest))
    }
}

struct Inner {
    base: ModelConfig,
    config: PagerConfig,
    state: Mutex<State>,
    data: RwLock<PoolData>,
    room: Condvar,
    metrics: PagerMetrics,
    /// The background loader: a name, and the version to load (`None`: the registered one).
    prefetch: Mutex<Option<Sender<(String, Option<Arc<AdapterManifest>>)>>>,
}

/// How long a failed disk load of an adapter version answers its requests at once before the
/// next request tries the disk again (a transient error, such as too many open files, passes).
pub const RETRY_FAILED_LOAD: std::time::Duration = std::time::Duration::from_secs(5);

/// The three-tier adapter store shared by the HTTP layer, the scheduler and the model.
#[derive(Clone)]
pub struct AdapterPager {
    inner: Arc<Inner>,
}

/// A pin on an adapter in the active pool; the adapter cannot be evicted while it lives.
pub struct AdapterLease {
    inner: Arc<Inner>,
    name: String,
    resident: Arc<ResidentAdapter>,
}

impl AdapterLease {
    /// The adapter's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The adapter as the model's LoRA op reads it.
    pub fn placed(&self) -> &dyn crate::model::lora::PlacedAdapter {
        &*self.resident
    }

    /// Where its weights sit in the pool.
    pub fn resident(&self) -> &ResidentAdapter {
        &self.resident
    }
}

impl std::fmt::Debug for AdapterLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterLease").field("name", &self.name).finish()
    }
}

impl Drop for AdapterLease {
    fn drop(&mut self) {
        let mut guard = self.inner.lock();
        let st = &mut *guard;
        let stale = match st.active.get_mut(&self.name) {
            Some(a) if Arc::ptr_eq(&a.resident, &self.resident) => {
                a.pins = a.pins.saturating_sub(1);
                let current = st.registry.get(&self.name).is_some_and(|m| Arc::ptr_eq(m, &a.manifest));
                a.pins == 0 && !current
            }
            _ => false,
        };
        if stale {
            // Unregistered or replaced while in use: free it now that the last user is done.
            if let Some(a) = st.active.remove(&self.name) {
                st.alloc.release(&a.resident);
            }
        }
        self.inner.update_gauges(st);
        drop(guard);
        self.inner.room.notify_all();
    }
}

fn lock_err<T>(e: std::sync::PoisonError<T>) -> T {
    e.into_inner()
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(lock_err)
    }

    fn update_gauges(&self, st: &State) {
        let g = &self.metrics.resident_bytes;
        g.with_label_values(&["disk"]).set(st.registry.values().map(|m| m.f32_bytes as i64).sum());
        g.with_label_values(&["host"]).set(st.host_bytes as i64);
        let used = st.alloc.total_pages() - st.alloc.free_pages();
        g.with_label_values(&["active"]).set((used * st.alloc.page_bytes()) as i64);
    }

    /// The adapter's weights in host memory, loading from disk (once, however many ask) if needed.
    fn host_weights(&self, name: &str, manifest: &Arc<AdapterManifest>) -> Result<Arc<LoraWeights>> {
        loop {
            let mut st = self.lock();
            st.clock += 1;
            let now = st.clock;
            if let Some(h) = st.host.get_mut(name)
                && Arc::ptr_eq(&h.manifest, manifest)
            {
                h.last_used = now;
                self.metrics.hits.with_label_values(&["host"]).inc();
                return Ok(h.weights.clone());
            }
            if let Some(wait) = st.loading.get(name).cloned() {
                drop(st);
                let mut done = wait.done.lock().unwrap_or_else(lock_err);
                while done.is_none() {
                    done = wait.cv.wait(done).unwrap_or_else(lock_err);
                }
                match done.as_ref() {
                    Some(Err(e)) => {
                        return Err(SubmitError::AdapterLoad { name: name.into(), source: e.clone() }.into());
                    }
                    // Loaded: loop to pick it up from the host tier (or reload if replaced).
                    _ => continue,
                }
            }
            let wait = Arc::new(LoadWait::default());
            st.loading.insert(name.to_string(), wait.clone());
            self.metrics.misses.with_label_values(&["host"]).inc();
            drop(st);

            let t0 = Instant::now();
            let loaded = manifest.load(&self.base).map(Arc::new);
            let mut st = self.lock();
            st.loading.remove(name);
            let result = match loaded {
                Ok(w) => {
                    self.metrics.load_seconds.with_label_values(&["host"]).observe(t0.elapsed().as_secs_f64());
                    st.clock += 1;
                    let entry = HostEntry { weights: w.clone(), manifest: manifest.clone(), last_used: st.clock };
                    if let Some(old) = st.host.insert(name.to_string(), entry) {
                        st.host_bytes -= old.weights.bytes;
                    }
                    st.host_bytes += w.bytes;
                    self.evict_host(&mut st, name);
                    st.failed.remove(name);
                    Ok(w)
                }
                Err(e) => {
                    self.metrics.load_failures.with_label_values(&["load"]).inc();
                    let e = Arc::new(e);
                    st.failed.insert(name.to_string(), (manifest.clone(), e.clone(), Instant::now()));
                    Err(e)
                }
            };
            self.update_gauges(&st);
            drop(st);
            *wait.done.lock().unwrap_or_else(lock_err) = Some(result.clone());
            wait.cv.notify_all();
            return result.map_err(|source| SubmitError::AdapterLoad { name: name.into(), source }.into());
        }
    }

    /// Evicts least-recently-used host entries (never `keep`) until the tier fits its capacity.
    /// An entry whose weights a device placement still holds stays: dropping it would free
    /// nothing, and keeping it counted is what bounds the host's adapter memory by this tier.
    fn evict_host(&self, st: &mut State, keep: &str) {
        while st.host_bytes > self.config.host_cache_bytes {
            let victim = st
                .host
                .iter()
                .filter(|(n, h)| n.as_str() != keep && Arc::strong_count(&h.weights) == 1)
                .min_by_key(|(_, h)| h.last_used);
            let Some(victim) = victim.map(|(n, _)| n.clone()) else { break };
            if let Some(h) = st.host.remove(&victim) {
                st.host_bytes -= h.weights.bytes;
                self.metrics.evictions.with_label_values(&["host"]).inc();
            }
        }
    }
}

/// What [`AdapterPager::try_acquire`] found.
pub enum Acquire {
    /// The adapter is resident and pinned.
    Ready(AdapterLease),
    /// The active pool is full of pinned adapters: try again when a lease is dropped.
    Later,
    /// Its weights are being read from disk in the background: serve others, ask again.
    Loading,
}

impl AdapterPager {
    /// A pager for adapters of `base`, with tiers sized by `config`.
    pub fn new(base: &ModelConfig, config: PagerConfig, metrics: PagerMetrics) -> Self {
        let page_elems = if config.page_elems == 0 { base.hidden_size } else { config.page_elems };
        let pages = config.active_pool_bytes / (page_elems * config.pool.value_bytes());
        let (alloc, data) = PageAllocator::new(pages, page_elems, config.pool);
        let state = State {
            registry: HashMap::new(),
            host: HashMap::new(),
            host_bytes: 0,
            active: HashMap::new(),
            alloc,
            loading: HashMap::new(),
            failed: HashMap::new(),
            queued: HashMap::new(),
            clock: 0,
        };
        let inner = Arc::new(Inner {
            base: base.clone(),
            config,
            state: Mutex::new(state),
            data: RwLock::new(data),
            room: Condvar::new(),
            metrics,
            prefetch: Mutex::new(None),
        });
        let (tx, rx) = channel::<(String, Option<Arc<AdapterManifest>>)>();
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        let spawned = std::thread::Builder::new().name("adapter-prefetch".into()).spawn(move || {
            while let Ok((name, version)) = rx.recv() {
                let Some(inner) = weak.upgrade() else { break };
                let manifest = {
                    let st = inner.lock();
                    version.or_else(|| st.registry.get(&name).cloned()).filter(|m| !st.in_memory(&name, m))
                };
                if let Some(m) = manifest {
                    // A failure is counted and reported to the request that needs it.
                    let _ = inner.host_weights(&name, &m);
                }
                inner.lock().queued.remove(&name);
            }
        });
        if spawned.is_ok() {
            *inner.prefetch.lock().unwrap_or_else(lock_err) = Some(tx);
        }
        AdapterPager { inner }
    }

    /// Validates an adapter folder against the base model and registers it under `name`,
    /// replacing any adapter of that name (users of the old one finish with it). Nothing
    /// changes if validation fails.
    pub fn register(&self, name: &str, dir: &Path) -> Result<()> {
        let manifest = Arc::new(AdapterManifest::inspect(dir, &self.inner.base)?);
        let mut st = self.inner.lock();
        // One that could never be placed in the active pool is refused now, not at first use.
        let need: usize = manifest
            .modules
            .iter()
            .map(|&(_, proj)| {
                let (out_dim, in_dim) = proj.shape(&self.inner.base);
                st.alloc.module_pages(manifest.config.rank, in_dim, out_dim)
            })
            .sum();
        if need > st.alloc.total_pages() {
            return Err(Error::from(SubmitError::AdapterTooLarge {
                name: name.to_string(),
                need_bytes: need * st.alloc.page_bytes(),
                pool_bytes: st.alloc.total_pages() * st.alloc.page_bytes(),
            }));
        }
        st.registry.insert(name.to_string(), manifest);
        st.failed.remove(name);
        if let Some(h) = st.host.remove(name) {
            st.host_bytes -= h.weights.bytes;
        }
        self.inner.update_gauges(&st);
        Ok(())
    }

    /// Removes an adapter; requests already using it finish first. Returns whether it existed.
    pub fn unregister(&self, name: &str) -> bool {
        let mut st = self.inner.lock();
        let existed = st.registry.remove(name).is_some();
        st.failed.remove(name);
        if let Some(h) = st.host.remove(name) {
            st.host_bytes -= h.weights.bytes;
        }
        if st.active.get(name).is_some_and(|a| a.pins == 0)
            && let Some(a) = st.active.remove(name)
        {
            st.alloc.release(&a.resident);
        }
        self.inner.update_gauges(&st);
        existed
    }

    /// Registered adapter names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.lock().registry.keys().cloned().collect();
        v.sort();
        v
    }

    /// The manifest of a registered adapter.
    pub fn manifest(&self, name: &str) -> Option<Arc<AdapterManifest>> {
        self.inner.lock().registry.get(name).cloned()
    }

    /// Asks the background loader to bring an adapter into host memory (a hint; never fails).
    pub fn prefetch(&self, name: &str) {
        if let Some(tx) = self.inner.prefetch.lock().unwrap_or_else(lock_err).as_ref() {
            let _ = tx.send((name.to_string(), None));
        }
    }

    /// Like [`AdapterPager::try_acquire_version`], but never reads the disk on the caller's
    /// thread: a version not in host memory yet is loaded by the background loader, and the
    /// caller is told [`Acquire::Loading`] (to serve others and ask again). A version whose
    /// load failed in the last [`RETRY_FAILED_LOAD`] is that error.
    pub fn try_acquire_loaded(&self, name: &str, manifest: &Arc<AdapterManifest>) -> Result<Acquire> {
        {
            let st = self.inner.lock();
            let in_memory = st.in_memory(name, manifest);
            if !in_memory {
                if let Some((m, e, at)) = st.failed.get(name)
                    && Arc::ptr_eq(m, manifest)
                    && at.elapsed() < RETRY_FAILED_LOAD
                {
                    return Err(SubmitError::AdapterLoad { name: name.into(), source: e.clone() }.into());
                }
                drop(st);
                if self.load_in_background(name, manifest) {
                    return Ok(Acquire::Loading);
                }
                // No background loader: load here.
            }
        }
        self.try_acquire_version(name, manifest)
    }

    /// Hands one version of an adapter to the background loader, once however often asked;
    /// `false` if there is no loader.
    pub fn load_in_background(&self, name: &str, manifest: &Arc<AdapterManifest>) -> bool {
        let mut st = self.inner.lock();
        if st.in_memory(name, manifest)
            || st.loading.contains_key(name)
            || st.queued.get(name).is_some_and(|m| Arc::ptr_eq(m, manifest))
        {
            return true;
        }
        let sent = self
            .inner
            .prefetch
            .lock()
            .unwrap_or_else(lock_err)
            .as_ref()
            .is_some_and(|tx| tx.send((name.to_string(), Some(manifest.clone()))).is_ok());
        if sent {
            st.queued.insert(name.to_string(), manifest.clone());
        }
        sent
    }

    /// Makes an adapter resident and pins it, or says to come back later when the pool is
    /// full of pinned adapters. Errors: unknown adapter, failed load, larger than the pool.
    ///
    /// Must not be called while holding [`AdapterPager::pool`].
    pub fn try_acquire(&self, name: &str) -> Result<Acquire> {
        let manifest = self.manifest(name).ok_or_else(|| SubmitError::UnknownAdapter(name.to_string()))?;
        self.try_acquire_version(name, &manifest)
    }

    /// Like [`AdapterPager::try_acquire`], for one version of the adapter (the one a request
    /// was admitted with), whether or not it is still the registered one. While another
    /// version of the name is resident and in use, this one waits ([`Acquire::Later`]).
    pub fn try_acquire_version(&self, name: &str, manifest: &Arc<AdapterManifest>) -> Result<Acquire> {
        let inner = &self.inner;
        {
            let mut st = inner.lock();
            st.clock += 1;
            let now = st.clock;
            if let Some(lease) = Self::pin_active(inner, &mut st, name, manifest, now) {
                inner.metrics.hits.with_label_values(&["active"]).inc();
                return Ok(Acquire::Ready(lease));
            }
            inner.metrics.misses.with_label_values(&["active"]).inc();
        }
        let manifest = manifest.clone();
        let weights = inner.host_weights(name, &manifest)?;
        let t0 = Instant::now();
        let mut st = inner.lock();
        st.clock += 1;
        let now = st.clock;
        if let Some(lease) = Self::pin_active(inner, &mut st, name, &manifest, now) {
            return Ok(Acquire::Ready(lease));
        }
        // Another version of this name is resident: free it if unused, else wait for its users.
        if let Some(other) = st.active.get(name) {
            if other.pins > 0 {
                return Ok(Acquire::Later);
            }
            if let Some(a) = st.active.remove(name) {
                st.alloc.release(&a.resident);
            }
        }
        let need = st.alloc.pages_needed(&weights);
        if need > st.alloc.total_pages() {
            return Err(Error::from(SubmitError::AdapterTooLarge {
                name: name.to_string(),
                need_bytes: need * st.alloc.page_bytes(),
                pool_bytes: st.alloc.total_pages() * st.alloc.page_bytes(),
            }));
        }
        while st.alloc.free_pages() < need {
            let victim =
                st.active.iter().filter(|(_, a)| a.pins == 0).min_by_key(|(_, a)| a.last_used).map(|(n, _)| n.clone());
            let Some(victim) = victim else { return Ok(Acquire::Later) };
            if let Some(a) = st.active.remove(&victim) {
                st.alloc.release(&a.resident);
                inner.metrics.evictions.with_label_values(&["active"]).inc();
            }
        }
        let resident = {
            let mut data = inner.data.write().unwrap_or_else(lock_err);
            st.alloc.place(&mut data, &weights)
        };
        let Some(resident) = resident else { return Ok(Acquire::Later) };
        let resident = Arc::new(resident);
        st.active
            .insert(name.to_string(), ActiveEntry { resident: resident.clone(), manifest, pins: 1, last_used: now });
        let took = t0.elapsed().as_secs_f64();
        inner.metrics.load_seconds.with_label_values(&["active"]).observe(took);
        inner.metrics.vllm_load_seconds.observe(took);
        inner.update_gauges(&st);
        Ok(Acquire::Ready(AdapterLease { inner: inner.clone(), name: name.to_string(), resident }))
    }

    fn pin_active(
        inner: &Arc<Inner>,
        st: &mut State,
        name: &str,
        manifest: &Arc<AdapterManifest>,
        now: u64,
    ) -> Option<AdapterLease> {
        let a = st.active.get_mut(name)?;
        if !Arc::ptr_eq(&a.manifest, manifest) {
            return None;
        }
        a.pins += 1;
        a.last_used = now;
        Some(AdapterLease { inner: inner.clone(), name: name.to_string(), resident: a.resident.clone() })
    }

    /// Like [`AdapterPager::try_acquire`], waiting up to `timeout` for room in the pool.
    pub fn acquire(&self, name: &str, timeout: Duration) -> Result<AdapterLease> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Acquire::Ready(lease) = self.try_acquire(name)? {
                return Ok(lease);
            }
            let st = self.inner.lock();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::from(SubmitError::PoolTimeout(name.to_string())));
            }
            // Woken when any lease is dropped; re-check either way.
            let _ = self.inner.room.wait_timeout(st, left.min(Duration::from_millis(50))).unwrap_or_else(lock_err);
        }
    }

    /// The pool's pages, for the LoRA op to read while a batch runs.
    pub fn pool(&self) -> RwLockReadGuard<'_, PoolData> {
        self.inner.data.read().unwrap_or_else(lock_err)
    }

    /// The pager's metrics (a GPU backend reports its uploads into them).
    pub fn metrics(&self) -> &PagerMetrics {
        &self.inner.metrics
    }

    /// The active pool's size in pages.
    pub fn pool_pages(&self) -> usize {
        self.inner.lock().alloc.total_pages()
    }

    /// Values per page of the active pool.
    pub fn page_elems(&self) -> usize {
        self.pool().page_elems()
    }

    /// A snapshot for tests and metrics: `(adapter, pins)` of every resident adapter, and free pages.
    pub fn active_snapshot(&self) -> (Vec<(String, usize)>, usize) {
        let st = self.inner.lock();
        let mut v: Vec<(String, usize)> = st.active.iter().map(|(n, a)| (n.clone(), a.pins)).collect();
        v.sort();
        (v, st.alloc.free_pages())
    }

    /// About how many adapters the active pool can hold at once: its pages over those a
    /// registered adapter needs on average (the pool's pages when none is registered).
    pub fn active_capacity(&self) -> usize {
        let (pages, page_bytes) = (self.pool_pages(), self.page_elems().max(1) * 4);
        let (total, count) = {
            let st = self.inner.lock();
            (st.registry.values().map(|m| m.f32_bytes).sum::<usize>(), st.registry.len())
        };
        if count == 0 {
            return pages;
        }
        (pages / (total / count).div_ceil(page_bytes).max(1)).max(1)
    }

    /// Names in the host tier.
    pub fn host_snapshot(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.lock().host.keys().cloned().collect();
        v.sort();
        v
    }
}
