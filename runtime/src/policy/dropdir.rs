//! Hot loading by dropping a file: `<slot>.wasm` (and optionally `<slot>.json`, its
//! configuration) in the plugins folder is validated and activated within about a second. A file
//! that fails validation is reported and changes nothing; it is retried when it changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::host::PolicyHost;
use super::slot::Slot;
use super::wasm::sha256_hex;

/// How often the folder is looked at.
const POLL: Duration = Duration::from_millis(500);

/// What a file looked like when last handled: modification times and sizes of plugin and config.
type Seen = (Option<SystemTime>, u64, Option<SystemTime>, u64);

fn stamp(path: &Path) -> (Option<SystemTime>, u64) {
    match std::fs::metadata(path) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(_) => (None, 0),
    }
}

/// Loads every new or changed plugin file in `dir` once; returns what it did, for logs and tests.
pub fn scan(policy: &PolicyHost, dir: &Path, seen: &mut HashMap<PathBuf, Seen>) -> Vec<String> {
    let mut report = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return report };
    let mut files: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "wasm")).collect();
    files.sort();
    for wasm in files {
        let Some(stem) = wasm.file_stem().and_then(|s| s.to_str()) else { continue };
        let json = wasm.with_extension("json");
        let (wm, ws) = stamp(&wasm);
        let (jm, js) = stamp(&json);
        let now = (wm, ws, jm, js);
        if seen.get(&wasm) == Some(&now) {
            continue;
        }
        seen.insert(wasm.clone(), now);
        let name = wasm.display();
        let slot: Slot = match stem.parse() {
            Ok(s) => s,
            Err(e) => {
                report.push(format!("{name}: not loaded: {e}"));
                continue;
            }
        };
        let bytes = match std::fs::read(&wasm) {
            Ok(b) => b,
            Err(e) => {
                report.push(format!("{name}: not loaded: {e}"));
                continue;
            }
        };
        let config = match std::fs::read_to_string(&json) {
            // Surrounding whitespace (an editor's trailing newline) is no part of it, as for uploads.
            Ok(c) => c.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                report.push(format!("{}: not loaded: {e}", json.display()));
                continue;
            }
        };
        let active = policy.registry.existing(&slot).and_then(|h| h.active.load_full());
        if active.is_some_and(|a| a.info.sha256 == sha256_hex(&bytes) && a.info.config == config) {
            continue;
        }
        match policy.install(&slot, &bytes, &config, &format!("dir:{stem}.wasm")) {
            Ok(v) => report.push(format!("{name}: slot {slot} now runs version {} (sha256 {})", v.version, v.sha256)),
            Err(e) => report.push(format!("{name}: not loaded, slot {slot} unchanged: {e}")),
        }
    }
    report
}

/// Told of each version a dropped-in file installs (slot, version), e.g. to record it in the
/// audit trail.
pub type Installed = Box<dyn Fn(&super::Slot, &super::VersionInfo) + Send>;

/// Watches `dir` in a background thread for the life of the process.
pub fn watch(policy: Arc<PolicyHost>, dir: PathBuf, installed: Installed) {
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "plugin folder unusable; dropped-in plugins will not load");
        return;
    }
    let spawned = std::thread::Builder::new().name("openlora-plugin-dir".into()).spawn(move || {
        let mut seen = HashMap::new();
        loop {
            let before: HashMap<_, _> =
                policy.list().into_iter().map(|v| (v.slot.clone(), v.versions.last().map(|i| i.version))).collect();
            for line in scan(&policy, &dir, &mut seen) {
                // The line may quote a plugin's own error text: a `&str` field, escaped.
                tracing::info!(dir = %dir.display(), report = line.as_str(), "plugin folder change");
            }
            for view in policy.list() {
                let newest = view.versions.last();
                let fresh = newest
                    .is_some_and(|n| n.source.starts_with("dir:") && before.get(&view.slot) != Some(&Some(n.version)));
                if let (true, Some(v)) = (fresh, newest) {
                    installed(&view.slot, v);
                }
            }
            std::thread::sleep(POLL);
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot watch the plugin folder");
    }
}
