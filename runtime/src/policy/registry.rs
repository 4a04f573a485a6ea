//! Installed plugins: every version of every slot, kept content-addressed on disk, the active one
//! per slot behind an atomic pointer (in-flight calls keep the version they started with), and
//! one-call rollback. State survives restarts: one file per slot under `<data_dir>/plugins/slots/`,
//! so that an install rewrites only its own slot's record however many slots there are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use super::plugin::CompiledPlugin;
use super::slot::{Slot, World};
use super::wasm::{WasmRuntime, sha256_hex, write_atomically};
use crate::error::{Error, PolicyError, Result};

/// One installed version of a slot's plugin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionInfo {
    /// The version's number within its slot (1, 2, ...).
    pub version: u32,
    /// The hex sha256 of the component.
    pub sha256: String,
    /// The configuration it runs with (JSON; empty for none).
    pub config: String,
    /// The component's size in bytes.
    pub size: usize,
    /// When it was installed, in milliseconds since the Unix epoch.
    pub installed_at_ms: u64,
    /// Where it came from (`admin`, `dir:<file>`, ...).
    pub source: String,
}

/// A slot's persistent record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SlotRecord {
    versions: Vec<VersionInfo>,
    /// Versions in the order they were activated; the last is active unless `active` is `None`.
    history: Vec<u32>,
    active: Option<u32>,
    /// The last version number given (numbers are never reused, even after a removal).
    #[serde(default)]
    last_version: u32,
}

/// Most versions a slot keeps; installing more removes the oldest that is not active.
pub const MAX_VERSIONS_PER_SLOT: usize = 32;

/// Removes a slot's oldest inactive versions beyond [`MAX_VERSIONS_PER_SLOT`]; whether any went.
fn prune_versions(rec: &mut SlotRecord) -> bool {
    let mut pruned = false;
    while rec.versions.len() > MAX_VERSIONS_PER_SLOT {
        let Some(at) = rec.versions.iter().position(|v| Some(v.version) != rec.active) else { break };
        let gone = rec.versions.remove(at).version;
        rec.history.retain(|v| *v != gone);
        pruned = true;
    }
    pruned
}

/// The folder under the plugin root holding one record file per slot.
const SLOTS_DIR: &str = "slots";

/// A slot's record as stored in its file.
#[derive(Serialize, Deserialize)]
struct StoredSlot {
    slot: String,
    #[serde(flatten)]
    record: SlotRecord,
}

/// The file name of a slot's record: the sha256 of its name (any length, any character).
fn slot_file(slot: &Slot) -> String {
    format!("{}.json", sha256_hex(slot.to_string().as_bytes()))
}

/// Reads every slot's record under `root`, moving a single-file `state.json` (older servers)
/// into one file per slot first.
fn read_records(root: &Path) -> Result<BTreeMap<Slot, SlotRecord>> {
    let mut records = BTreeMap::new();
    let legacy = root.join("state.json");
    if legacy.is_file() {
        let text = std::fs::read_to_string(&legacy).map_err(|e| Error::io(&legacy, e))?;
        let raw: BTreeMap<String, SlotRecord> = serde_json::from_str(&text)
            .map_err(|e| Error::config(&legacy, "-", format!("not a plugin state file: {e}")))?;
        let dir = root.join(SLOTS_DIR);
        for (name, record) in raw {
            let slot: Slot = name.parse().map_err(|m| Error::config(&legacy, &name, m))?;
            let path = dir.join(slot_file(&slot));
            let text = serde_json::to_vec_pretty(&StoredSlot { slot: name, record })
                .map_err(|e| Error::config(&path, "-", e.to_string()))?;
            write_atomically(&dir, &path, &text).map_err(|e| Error::io(&path, e))?;
        }
        std::fs::remove_file(&legacy).map_err(|e| Error::io(&legacy, e))?;
    }
    let dir = root.join(SLOTS_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(records) };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let stored: StoredSlot = serde_json::from_str(&text)
            .map_err(|e| Error::config(&path, "-", format!("not a plugin slot record: {e}")))?;
        let slot: Slot = stored.slot.parse().map_err(|m| Error::config(&path, "slot", m))?;
        records.insert(slot, stored.record);
    }
    Ok(records)
}

/// The largest plugin configuration accepted, in bytes (it is recorded with every decision).
pub const MAX_CONFIG_BYTES: usize = 64 << 10;

/// The active plugin of a slot.
pub struct Active {
    /// Which version it is.
    pub info: VersionInfo,
    /// The compiled plugin.
    pub plugin: Arc<CompiledPlugin>,
}

/// A slot's live state: read on every request without locks.
#[derive(Default)]
pub struct SlotHandle {
    /// The active version, if any (otherwise the built-in answers).
    pub active: ArcSwapOption<Active>,
    /// Consecutive failures of the active version.
    pub failures: AtomicU32,
    /// Whether the active version is quarantined (the built-in answers instead).
    pub quarantined: AtomicBool,
    /// The outcomes of its last calls, for quarantine by failure rate.
    pub window: FailureWindow,
}

/// The outcomes of a plugin version's last [`FailureWindow::CALLS`] calls: a plugin that fails
/// on a fraction of its calls (only some requests) is caught by its rate, not only by failures
/// in a row.
#[derive(Default)]
pub struct FailureWindow(std::sync::Mutex<(u128, u32)>);

impl FailureWindow {
    /// How many calls the window holds.
    pub const CALLS: u32 = 100;

    /// Records one call; returns the failures and the calls now in the window.
    pub fn record(&self, failed: bool) -> (u32, u32) {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        w.0 = ((w.0 << 1) | u128::from(failed)) & ((1u128 << Self::CALLS) - 1);
        w.1 = (w.1 + 1).min(Self::CALLS);
        (w.0.count_ones(), w.1)
    }

    /// Forgets every call (a version was activated).
    pub fn reset(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = (0, 0);
    }
}

/// What `GET /admin/plugins` shows of one slot.
#[derive(Debug, Clone, Serialize)]
pub struct SlotView {
    /// The slot.
    pub slot: Slot,
    /// The active version number, if any.
    pub active: Option<u32>,
    /// Whether the active version is quarantined.
    pub quarantined: bool,
    /// Consecutive failures of the active version.
    pub consecutive_failures: u32,
    /// Every installed version, oldest first.
    pub versions: Vec<VersionInfo>,
}

impl SlotView {
    /// A slot without a plugin: its built-in answers.
    pub fn empty(slot: Slot) -> Self {
        SlotView { slot, active: None, quarantined: false, consecutive_failures: 0, versions: Vec::new() }
    }
}

/// Refuses a configuration over [`MAX_CONFIG_BYTES`].
fn check_config_size(slot: &Slot, config: &str) -> Result<()> {
    if config.len() > MAX_CONFIG_BYTES {
        return Err(PolicyError::PluginInvalid {
            what: format!("for slot {slot}"),
            message: format!("its configuration is {} bytes; at most {MAX_CONFIG_BYTES}", config.len()),
        }
        .into());
    }
    Ok(())
}

/// Every slot's plugins.
pub struct Registry {
    runtime: Arc<WasmRuntime>,
    root: Option<PathBuf>,
    slots: DashMap<Slot, Arc<SlotHandle>>,
    records: Mutex<BTreeMap<Slot, SlotRecord>>,
    /// Component bytes by sha256 when there is no `root` to keep them in.
    in_memory: DashMap<String, Arc<Vec<u8>>>,
    /// Every configuration a loaded version runs with, by sha256, for the ledger to store once.
    configs: DashMap<String, Arc<str>>,
    /// Blobs no version names any more, with when they stopped being named: removed once
    /// [`BLOB_GRACE`] has passed (a request that just ran one has written its entry, and the
    /// ledger its own copy, by then).
    orphans: Mutex<Vec<(String, std::time::Instant)>>,
}

/// How long a blob no version names is kept before it is removed.
const BLOB_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Registry {
    /// A registry keeping its files under `root` (`None`: in memory only), restoring the active
    /// version of every slot recorded there. A version that no longer loads is reported and skipped.
    pub fn open(runtime: Arc<WasmRuntime>, root: Option<PathBuf>) -> Result<Self> {
        let records = match &root {
            Some(root) => read_records(root)?,
            None => BTreeMap::new(),
        };
        let registry = Registry {
            runtime,
            root,
            slots: DashMap::new(),
            records: Mutex::new(BTreeMap::new()),
            in_memory: DashMap::new(),
            configs: DashMap::new(),
            orphans: Mutex::new(Vec::new()),
        };
        for (slot, rec) in records {
            let active = rec.active.and_then(|v| rec.versions.iter().find(|i| i.version == v).cloned());
            if let Some(info) = active {
                match registry.compile(&slot, &info) {
                    Ok(plugin) => registry.handle(&slot).active.store(Some(Arc::new(Active { info, plugin }))),
                    Err(e) => tracing::warn!(
                        slot = %slot,
                        version = info.version,
                        error = %e,
                        "plugin version not restored"
                    ),
                }
            }
            registry.lock().insert(slot, rec);
        }
        // Nothing is running yet: a blob no version names can go at once.
        registry.remove_blobs(registry.unnamed_blobs());
        Ok(registry)
    }

    /// The sha256 of every stored blob no version of any slot names.
    fn unnamed_blobs(&self) -> Vec<String> {
        let stored: Vec<String> = match &self.root {
            Some(root) => std::fs::read_dir(root.join("blobs"))
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".wasm").map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            None => self.in_memory.iter().map(|e| e.key().clone()).collect(),
        };
        let records = self.lock();
        let named: std::collections::HashSet<&str> =
            records.values().flat_map(|r| r.versions.iter().map(|v| v.sha256.as_str())).collect();
        stored.into_iter().filter(|sha| !named.contains(sha.as_str())).collect()
    }

    fn remove_blobs(&self, shas: Vec<String>) {
        for sha in shas {
            self.in_memory.remove(&sha);
            if let Some(root) = &self.root {
                let path = root.join("blobs").join(format!("{sha}.wasm"));
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(sha256 = sha.as_str(), error = %e, "removing an unused plugin blob failed");
                }
            }
        }
    }

    /// Removes the blobs that no version has named for [`BLOB_GRACE`], noting the ones that
    /// have just stopped being named.
    fn collect_blobs(&self) {
        let unnamed = self.unnamed_blobs();
        let now = std::time::Instant::now();
        let due = {
            let mut orphans = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
            orphans.retain(|(sha, _)| unnamed.contains(sha));
            for sha in &unnamed {
                if !orphans.iter().any(|(s, _)| s == sha) {
                    orphans.push((sha.clone(), now));
                }
            }
            let (due, keep): (Vec<_>, Vec<_>) =
                orphans.drain(..).partition(|(_, since)| now.duration_since(*since) >= BLOB_GRACE);
            *orphans = keep;
            due.into_iter().map(|(sha, _)| sha).collect()
        };
        self.remove_blobs(due);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Slot, SlotRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live handle of `slot` (created empty on first use).
    pub fn handle(&self, slot: &Slot) -> Arc<SlotHandle> {
        if let Some(h) = self.slots.get(slot) {
            return h.clone();
        }
        self.slots.entry(slot.clone()).or_default().clone()
    }

    /// The live handle of `slot` if it ever had a plugin (no allocation on the request path).
    pub fn existing(&self, slot: &Slot) -> Option<Arc<SlotHandle>> {
        self.slots.get(slot).map(|h| h.clone())
    }

    /// The stored bytes of the component with this sha256 (for replay), if kept.
    pub fn blob(&self, sha256: &str) -> Option<Vec<u8>> {
        let Some(root) = self.root.as_ref() else {
            return self.in_memory.get(sha256).map(|b| b.as_ref().clone());
        };
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        std::fs::read(root.join("blobs").join(format!("{sha256}.wasm"))).ok()
    }

    fn compile(&self, slot: &Slot, info: &VersionInfo) -> Result<Arc<CompiledPlugin>> {
        let bytes = self
            .blob(&info.sha256)
            .ok_or_else(|| Error::from(PolicyError::UnknownPlugin(format!("blob {} of slot {slot}", info.sha256))))?;
        self.load(&format!("{slot} v{}", info.version), &bytes, slot.world(), &info.config)
    }

    /// Loads a plugin version and remembers its configuration by sha256.
    fn load(&self, what: &str, bytes: &[u8], world: World, config: &str) -> Result<Arc<CompiledPlugin>> {
        let plugin = self.runtime.load(what, bytes, world, config)?;
        if let Some(sha) = &plugin.config_sha256 {
            self.configs.entry(sha.clone()).or_insert_with(|| Arc::from(config));
        }
        Ok(plugin)
    }

    /// Validates and compiles `bytes` (with `config`) for `slot` as an install would, without
    /// installing it or keeping anything (a dry-run's candidate).
    pub fn candidate(&self, slot: &Slot, bytes: &[u8], config: &str) -> Result<Arc<CompiledPlugin>> {
        check_config_size(slot, config)?;
        self.runtime.load(&format!("for slot {slot}"), bytes, slot.world(), config)
    }

    /// A configuration some loaded version ran with, by its sha256 (hex).
    pub fn config(&self, sha256: &str) -> Option<Arc<str>> {
        self.configs.get(sha256).map(|c| c.clone())
    }

    /// Validates `bytes` (with `config`) as a plugin for `slot`, stores it and makes it active.
    /// Nothing changes if validation fails. Installing the same bytes and config again re-activates
    /// that version instead of adding one.
    /// `guard` runs under the registry's lock, just before anything changes, given the slot's
    /// active version then: an error from it refuses the install.
    pub fn install(
        &self,
        slot: &Slot,
        bytes: &[u8],
        config: &str,
        source: &str,
        guard: &dyn Fn(Option<u32>) -> Result<()>,
    ) -> Result<VersionInfo> {
        check_config_size(slot, config)?;
        let plugin = self.load(&format!("for slot {slot}"), bytes, slot.world(), config)?;
        let sha256 = sha256_hex(bytes);
        match &self.root {
            Some(root) => {
                let dir = root.join("blobs");
                let path = dir.join(format!("{sha256}.wasm"));
                if !path.is_file() {
                    write_atomically(&dir, &path, bytes).map_err(|e| Error::io(&path, e))?;
                }
            }
            None => {
                self.in_memory.entry(sha256.clone()).or_insert_with(|| Arc::new(bytes.to_vec()));
            }
        }
        let mut records = self.lock();
        guard(records.get(slot).and_then(|r| r.active))?;
        let rec = records.entry(slot.clone()).or_default();
        let info = match rec.versions.iter().find(|v| v.sha256 == sha256 && v.config == config) {
            Some(existing) => existing.clone(),
            None => {
                let version = rec.versions.iter().map(|v| v.version).max().unwrap_or(0).max(rec.last_version) + 1;
                rec.last_version = version;
                let info = VersionInfo {
                    version,
                    sha256,
                    config: config.to_string(),
                    size: bytes.len(),
                    installed_at_ms: now_ms(),
                    source: source.to_string(),
                };
                rec.versions.push(info.clone());
                info
            }
        };
        rec.history.push(info.version);
        rec.active = Some(info.version);
        let pruned = prune_versions(rec);
        self.swap_in(slot, Some(Arc::new(Active { info: info.clone(), plugin })));
        self.persist(slot, &records)?;
        drop(records);
        if pruned {
            self.collect_blobs();
        }
        Ok(info)
    }

    /// Removes an installed version that is not active (its blob goes once no version names it).
    pub fn remove_version(&self, slot: &Slot, version: u32) -> Result<()> {
        let mut records = self.lock();
        let rec =
            records.get_mut(slot).ok_or_else(|| Error::from(PolicyError::UnknownPlugin(format!("slot {slot}"))))?;
        if rec.active == Some(version) {
            return Err(PolicyError::InUse(format!(
                "version {version} of slot {slot} is active: activate another version or deactivate the slot first"
            ))
            .into());
        }
        let before = rec.versions.len();
        rec.versions.retain(|v| v.version != version);
        if rec.versions.len() == before {
            return Err(PolicyError::UnknownPlugin(format!("version {version} in slot {slot}")).into());
        }
        rec.history.retain(|v| *v != version);
        self.persist(slot, &records)?;
        drop(records);
        self.collect_blobs();
        Ok(())
    }

    /// Makes an installed version active again.
    pub fn activate(&self, slot: &Slot, version: u32) -> Result<VersionInfo> {
        let info =
            {
                let records = self.lock();
                let rec =
                    records.get(slot).ok_or_else(|| Error::from(PolicyError::UnknownPlugin(format!("slot {slot}"))))?;
                rec.versions.iter().find(|v| v.version == version).cloned().ok_or_else(|| {
                    Error::from(PolicyError::UnknownPlugin(format!("version {version} in slot {slot}")))
                })?
            };
        let plugin = self.compile(slot, &info)?;
        let mut records = self.lock();
        let rec = records.entry(slot.clone()).or_default();
        rec.history.push(version);
        rec.active = Some(version);
        self.swap_in(slot, Some(Arc::new(Active { info: info.clone(), plugin })));
        self.persist(slot, &records)?;
        Ok(info)
    }

    /// Re-activates the version active before the current one (the built-in if there was none).
    pub fn rollback(&self, slot: &Slot) -> Result<Option<VersionInfo>> {
        let previous = {
            let records = self.lock();
            let rec =
                records.get(slot).ok_or_else(|| Error::from(PolicyError::UnknownPlugin(format!("slot {slot}"))))?;
            if rec.active.is_none() {
                return Err(Error::from(PolicyError::UnknownPlugin(format!(
                    "active version in slot {slot} to roll back from"
                ))));
            }
            let mut history = rec.history.clone();
            history.pop();
            let previous = history.last().copied();
            (history, previous)
        };
        let (history, previous) = previous;
        let next = match previous {
            Some(v) => {
                let records = self.lock();
                let info = records.get(slot).and_then(|r| r.versions.iter().find(|i| i.version == v).cloned());
                drop(records);
                let info =
                    info.ok_or_else(|| Error::from(PolicyError::UnknownPlugin(format!("version {v} in slot {slot}"))))?;
                let plugin = self.compile(slot, &info)?;
                Some(Arc::new(Active { info, plugin }))
            }
            None => None,
        };
        let mut records = self.lock();
        let rec = records.entry(slot.clone()).or_default();
        rec.history = history;
        rec.active = previous;
        let info = next.as_ref().map(|a| a.info.clone());
        self.swap_in(slot, next);
        self.persist(slot, &records)?;
        Ok(info)
    }

    /// Deactivates the slot's plugin (the built-in answers); its versions are kept.
    pub fn deactivate(&self, slot: &Slot) -> Result<()> {
        let mut records = self.lock();
        let rec =
            records.get_mut(slot).ok_or_else(|| Error::from(PolicyError::UnknownPlugin(format!("slot {slot}"))))?;
        rec.active = None;
        rec.history.clear();
        self.swap_in(slot, None);
        self.persist(slot, &records)
    }

    /// Forgets a slot with every version it had (a later slot of the same name starts empty).
    /// Its blobs go once no version names them (the ledger keeps its own copy of every plugin
    /// an entry names).
    pub fn remove(&self, slot: &Slot) -> Result<()> {
        let mut records = self.lock();
        if records.remove(slot).is_none() {
            return Err(PolicyError::UnknownPlugin(format!("slot {slot}")).into());
        }
        self.swap_in(slot, None);
        self.slots.remove(slot);
        self.persist(slot, &records)?;
        drop(records);
        self.collect_blobs();
        Ok(())
    }

    fn swap_in(&self, slot: &Slot, active: Option<Arc<Active>>) {
        let handle = self.handle(slot);
        handle.active.store(active);
        handle.failures.store(0, Ordering::Relaxed);
        handle.window.reset();
        handle.quarantined.store(false, Ordering::Relaxed);
    }

    /// Writes `slot`'s record (or removes its file when the slot is gone).
    fn persist(&self, slot: &Slot, records: &BTreeMap<Slot, SlotRecord>) -> Result<()> {
        let Some(root) = &self.root else { return Ok(()) };
        let dir = root.join(SLOTS_DIR);
        let path = dir.join(slot_file(slot));
        match records.get(slot) {
            Some(rec) => {
                let text = serde_json::to_vec_pretty(&StoredSlot { slot: slot.to_string(), record: rec.clone() })
                    .map_err(|e| Error::config(&path, "-", e.to_string()))?;
                write_atomically(&dir, &path, &text).map_err(|e| Error::io(&path, e))
            }
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&path, e)),
                _ => Ok(()),
            },
        }
    }

    /// Every slot that has versions, with its state.
    pub fn list(&self) -> Vec<SlotView> {
        self.lock()
            .iter()
            .map(|(slot, rec)| {
                let handle = self.handle(slot);
                SlotView {
                    slot: slot.clone(),
                    active: rec.active,
                    quarantined: handle.quarantined.load(Ordering::Relaxed),
                    consecutive_failures: handle.failures.load(Ordering::Relaxed),
                    versions: rec.versions.clone(),
                }
            })
            .collect()
    }
}
