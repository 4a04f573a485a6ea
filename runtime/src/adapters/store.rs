//! Uploaded adapters on disk: every version in its own folder named by the sha256 of its files,
//! and the current version of every name in one manifest, replaced atomically and durably
//! (written, synced, renamed, the folder synced). Writes are serialised, so concurrent uploads to
//! one name commit one after the other and each caller learns the version it got. A deleted or
//! replaced version's folder is removed once no request holds it; at start, everything the
//! manifest does not name (half-written uploads, old versions, deleted adapters) is removed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The manifest's file name under the store's root.
const MANIFEST: &str = "manifest.json";
/// The folder of versions under the store's root.
const VERSIONS: &str = "versions";
/// The prefix of an upload being written.
const STAGING: &str = ".upload-";

/// One name's current version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredVersion {
    /// The sha256 of its files, which names its folder.
    pub files_sha256: String,
    /// When it was stored, milliseconds since the Unix epoch.
    pub stored_at_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    adapters: BTreeMap<String, StoredVersion>,
}

/// What a commit did.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Whether the name had a version before.
    pub replaced: bool,
    /// The version now current.
    pub version: StoredVersion,
}

/// What a request admitted with a version holds (its manifest); the version's folder stays while
/// any is alive.
pub type Held = Arc<dyn std::any::Any + Send + Sync>;

/// The adapter store (see the module's documentation).
pub struct AdapterStore {
    root: PathBuf,
    manifest: Mutex<Manifest>,
    /// Versions no longer current, with the manifest requests admitted with them hold.
    retired: Mutex<Vec<(PathBuf, Weak<dyn std::any::Any + Send + Sync>)>>,
}

impl AdapterStore {
    /// Opens (or creates) the store under `root` and removes what its manifest does not name.
    pub fn open(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root.join(VERSIONS)).map_err(|e| Error::io(root, e))?;
        let path = root.join(MANIFEST);
        let manifest = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::config(&path, "-", format!("not an adapter store manifest: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest::default(),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let store =
            AdapterStore { root: root.to_path_buf(), manifest: Mutex::new(manifest), retired: Mutex::default() };
        store.remove_unnamed()?;
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Manifest> {
        self.manifest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The folder of a version.
    pub fn folder(&self, version: &StoredVersion) -> PathBuf {
        self.root.join(VERSIONS).join(&version.files_sha256)
    }

    /// Every stored name with its current version's folder.
    pub fn current(&self) -> Vec<(String, PathBuf)> {
        self.lock().adapters.iter().map(|(n, v)| (n.clone(), self.folder(v))).collect()
    }

    /// A new, empty folder to write an upload into (removed at the next start if not committed).
    pub fn stage(&self) -> Result<PathBuf> {
        let dir = self.root.join(format!("{STAGING}{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(dir)
    }

    /// Makes the staged folder `staged` (its files synced, see [`write_synced`]) the current
    /// version of `name`. `register` puts the version's folder into service and returns the
    /// manifest of the version it replaces; if it fails, nothing changes.
    pub fn commit(
        &self,
        name: &str,
        staged: &Path,
        register: impl FnOnce(&Path) -> Result<Option<Held>>,
    ) -> Result<Committed> {
        let sha = files_sha256(staged)?;
        let version = StoredVersion { files_sha256: sha, stored_at_ms: crate::ledger::now_ms() };
        let folder = self.folder(&version);
        let mut manifest = self.lock();
        let new_folder = !folder.is_dir();
        if new_folder {
            sync_dir(staged)?;
            std::fs::rename(staged, &folder).map_err(|e| Error::io(&folder, e))?;
            sync_dir(&self.root.join(VERSIONS))?;
        } else {
            let _ = std::fs::remove_dir_all(staged);
        }
        let previous = match register(&folder) {
            Ok(p) => p,
            Err(e) => {
                if new_folder {
                    let _ = std::fs::remove_dir_all(&folder);
                }
                return Err(e);
            }
        };
        let before = manifest.adapters.insert(name.to_string(), version.clone());
        if let Err(e) = self.persist(&manifest) {
            // Not recorded: the previous state stays current on disk; say so.
            match before {
                Some(b) => manifest.adapters.insert(name.to_string(), b),
                None => manifest.adapters.remove(name),
            };
            return Err(e);
        }
        let replaced = before.is_some();
        if let Some(old) = before.filter(|b| b.files_sha256 != version.files_sha256) {
            self.retire(self.folder(&old), previous);
        }
        self.collect_named(&manifest);
        Ok(Committed { replaced, version })
    }

    /// Removes `name` (durably); `unregister` takes it out of service and returns the manifest
    /// of the version it served. `false` if the store did not hold it.
    pub fn remove(&self, name: &str, unregister: impl FnOnce() -> Option<Held>) -> Result<bool> {
        let mut manifest = self.lock();
        let Some(old) = manifest.adapters.remove(name) else { return Ok(false) };
        if let Err(e) = self.persist(&manifest) {
            manifest.adapters.insert(name.to_string(), old);
            return Err(e);
        }
        let held = unregister();
        self.retire(self.folder(&old), held);
        self.collect_named(&manifest);
        Ok(true)
    }

    /// Whether the store holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().adapters.contains_key(name)
    }

    fn retire(&self, folder: PathBuf, held: Option<Held>) {
        let weak: Weak<dyn std::any::Any + Send + Sync> = match &held {
            Some(h) => Arc::downgrade(h),
            None => Weak::<()>::new(),
        };
        self.retired.lock().unwrap_or_else(|p| p.into_inner()).push((folder, weak));
    }

    /// Removes retired folders no request holds any more and no name uses again.
    pub fn collect(&self) {
        let manifest = self.lock();
        self.collect_named(&manifest);
    }

    /// [`AdapterStore::collect`] with the manifest locked (a commit reusing a retired folder
    /// cannot race its removal).
    fn collect_named(&self, manifest: &Manifest) {
        let named: Vec<PathBuf> = manifest.adapters.values().map(|v| self.folder(v)).collect();
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|(folder, held)| {
            if named.contains(folder) {
                // Another name uses the same files now: keep watching this one's holders too.
                return true;
            }
            if held.strong_count() > 0 {
                return true;
            }
            if let Err(e) = std::fs::remove_dir_all(folder)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(folder = %folder.display(), error = %e, "removing a retired adapter version failed");
            }
            false
        });
    }

    /// Removes every folder the manifest does not name (at start: nothing is running yet).
    fn remove_unnamed(&self) -> Result<()> {
        let named: Vec<String> = self.lock().adapters.values().map(|v| v.files_sha256.clone()).collect();
        let versions = self.root.join(VERSIONS);
        for (dir, keep) in [(&self.root, None), (&versions, Some(&named))] {
            let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            for entry in entries.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                let stale = match keep {
                    None => file.starts_with(STAGING) || file.contains('@'),
                    Some(named) => !named.contains(&file),
                };
                if stale {
                    tracing::info!(folder = %entry.path().display(), "removing an adapter folder no name uses");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(())
    }

    fn persist(&self, manifest: &Manifest) -> Result<()> {
        let path = self.root.join(MANIFEST);
        let tmp = self.root.join(format!("{MANIFEST}.tmp"));
        let text = serde_json::to_vec_pretty(manifest).map_err(|e| Error::config(&path, "-", e.to_string()))?;
        write_synced(&tmp, &text)?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        sync_dir(&self.root)
    }
}

/// Writes a file and syncs it to disk.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| Error::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

/// The sha256 of every file in a folder (names, lengths and bytes).
fn files_sha256(dir: &Path) -> Result<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            files.push(entry.path());
        }
    }
    crate::model::content_hash(dir, &files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(store: &AdapterStore, text: &str) -> PathBuf {
        let dir = store.stage().unwrap();
        write_synced(&dir.join("adapter_config.json"), text.as_bytes()).unwrap();
        dir
    }

    #[test]
    fn deletes_and_replacements_survive_a_restart_and_old_versions_go_once_released() {
        let root = std::env::temp_dir().join(format!("openlora-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = AdapterStore::open(&root).unwrap();
        let first = store.commit("a", &staged(&store, "1"), |_| Ok(None)).unwrap();
        assert!(!first.replaced);
        let v1 = store.folder(&first.version);
        // A request holds version 1 while it is replaced: its folder stays until released.
        let held: Held = Arc::new(());
        let second = store.commit("a", &staged(&store, "2"), |_| Ok(Some(held.clone()))).unwrap();
        assert!(second.replaced && v1.is_dir());
        drop(held);
        store.collect();
        assert!(!v1.exists(), "released, then removed");
        store.commit("b", &staged(&store, "3"), |_| Ok(None)).unwrap();
        assert!(store.remove("b", || None).unwrap());
        let half = store.stage().unwrap();
        drop(store);
        let again = AdapterStore::open(&root).unwrap();
        let names: Vec<String> = again.current().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a"], "the delete held, the replacement held");
        assert_eq!(again.current()[0].1, again.folder(&second.version));
        assert!(!half.exists(), "a half-written upload is removed at start");
        assert_eq!(std::fs::read_dir(root.join(VERSIONS)).unwrap().count(), 1, "only the current version is kept");
        let _ = std::fs::remove_dir_all(&root);
    }
}
