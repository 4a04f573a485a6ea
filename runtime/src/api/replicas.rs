//! Replicas that share one PostgreSQL database (their ledger's) share their adapters and
//! plugins too. Every change one of them makes — an adapter uploaded, loaded or deleted; a
//! plugin installed, reconfigured, activated, rolled back or deactivated — is published as its
//! target's whole new state, with the files it needs as content-addressed blobs, in one ordered
//! change log, and announced with `NOTIFY`. Every replica (the one that made it too) applies the
//! log in order, so all converge on the state of the latest change to each target, whatever
//! order the changes were made in. A replica catches up when it starts (the latest change of
//! every target) and also reads the log every few seconds, so a lost notification or a dropped
//! connection only delays a change. Keys, accounts, the audit trail and the ledger are already
//! in that database. Plugins dropped into a replica's folder stay that replica's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState};
use crate::accounts::Caller;
use crate::error::{AccountError, Error, Result};
use crate::policy::Slot;
use crate::policy::wasm::sha256_hex;
use crate::sql::{Db, Val};

/// The channel changes are announced on.
pub const CHANNEL: &str = "openlora_changes";

/// How often a replica reads the log without being told to.
const POLL: Duration = Duration::from_secs(2);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS shared_blobs (sha256 TEXT PRIMARY KEY, bytes BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS shared_changes (
    seq BIGSERIAL PRIMARY KEY,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    origin TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    blobs TEXT NOT NULL DEFAULT ''
);
ALTER TABLE shared_changes ADD COLUMN IF NOT EXISTS blobs TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS shared_changes_by_target ON shared_changes (target, seq);
";

/// One target's state, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum TargetState {
    /// An uploaded adapter: its files, or none (deleted).
    Adapter { name: String, version: Option<AdapterVersion> },
    /// A plugin slot: its active component and configuration, or none (the built-in answers).
    Slot { slot: String, active: Option<ActivePlugin> },
}

/// An adapter's version: the content hash of its weights and configuration, its owner, and the
/// sha256 of each of its files (whose bytes are in `shared_blobs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdapterVersion {
    sha256: String,
    owner: Option<String>,
    files: BTreeMap<String, String>,
}

/// A slot's active plugin: its component's sha256 (bytes in `shared_blobs`) and configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivePlugin {
    sha256: String,
    config: String,
}

impl TargetState {
    fn key(&self) -> String {
        match self {
            TargetState::Adapter { name, .. } => format!("adapter:{name}"),
            TargetState::Slot { slot, .. } => format!("slot:{slot}"),
        }
    }
}

/// This replica's part in sharing state (see the module's documentation).
pub struct Replication {
    url: String,
    /// Names this process in the log (random per start).
    origin: String,
    /// The connection changes are published on (one publisher at a time).
    publisher: Mutex<Option<Db>>,
    /// The last change read from the log.
    applied: AtomicI64,
    /// Targets whose latest change could not be applied here yet: tried again at each read.
    failed: Mutex<BTreeSet<String>>,
    /// Held by a local act from its change to its publication, and by the follower while it
    /// applies a change: a change read from the log never lands between an act and its
    /// publication (which would publish the older state in place of the act's).
    serial: Arc<tokio::sync::Mutex<()>>,
}

fn now_ms() -> i64 {
    crate::ledger::now_ms().min(i64::MAX as u64) as i64
}

impl Replication {
    /// Connects to the database at `url` and makes the log's tables.
    pub fn open(url: &str) -> Result<Self> {
        let mut db = connect(url)?;
        db.batch(SCHEMA)?;
        let origin = format!("{:016x}", rand::random::<u64>());
        Ok(Replication {
            url: url.to_string(),
            origin,
            publisher: Mutex::new(Some(db)),
            applied: AtomicI64::new(0),
            failed: Mutex::default(),
            serial: Arc::default(),
        })
    }

    /// Holds back the follower while a local act changes something and publishes it.
    pub async fn serial(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.serial.clone().lock_owned().await
    }

    /// Publishes the current state of what an administrative act by `by` (`action` on `target`,
    /// as the audit trail names them) changed; acts on other things publish nothing. An owner's
    /// adapter is held to the rules every replica shares, checked here under the log's lock: a
    /// name another owner holds is refused (409), and so is an owner's adapter beyond its quota
    /// counted over all replicas (429); either way the local change is undone.
    pub fn publish(&self, state: &AppState, by: &Caller, action: &str, target: &str) -> Result<()> {
        let TargetStateWithBlobs(now, blobs) = if action.starts_with("adapter.") {
            adapter_state(state, target)?
        } else if action.starts_with("plugin.") {
            let Ok(slot) = target.parse::<Slot>() else { return Ok(()) };
            slot_state(state, &slot)
        } else {
            return Ok(());
        };
        let key = now.key();
        let text = serde_json::to_string(&now).map_err(|e| Error::io("a change", std::io::Error::other(e)))?;
        let refs: Vec<&str> = blobs.iter().map(|(sha, _)| sha.as_str()).collect();
        let refs = refs.join(" ");
        let owner_quota = match (by, &now) {
            (Caller::Owner { name, .. }, TargetState::Adapter { version: Some(_), .. }) => {
                Some((name.clone(), state.accounts.quotas(name)?.max_adapters))
            }
            _ => None,
        };
        let mut guard = self.publisher.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(connect(&self.url)?);
        }
        let db = guard.as_mut().expect("connected just above");
        let written = db.atomically(|db| {
            // One publisher at a time: sequence numbers commit in order, so a reader that has
            // seen change N has seen every change before it; the checks below see every
            // replica's changes; and no other publisher's compaction removes a blob between
            // this one finding it there and naming it.
            db.batch("LOCK TABLE shared_changes IN EXCLUSIVE MODE")?;
            for (sha, bytes) in blobs {
                if db.rows("SELECT 1 FROM shared_blobs WHERE sha256 = $1", &[sha.as_str().into()])?.is_empty() {
                    db.exec(
                        "INSERT INTO shared_blobs (sha256, bytes) VALUES ($1, $2) ON CONFLICT (sha256) DO NOTHING",
                        &[sha.into(), Val::Bytes(bytes)],
                    )?;
                }
            }
            if let Some((me, max)) = &owner_quota {
                check_owner(db, &key, me, *max)?;
            }
            let seq = db.rows(
                "INSERT INTO shared_changes (target, state, origin, at_ms, blobs) VALUES ($1, $2, $3, $4, $5) \
                 RETURNING seq",
                &[
                    key.as_str().into(),
                    text.as_str().into(),
                    self.origin.as_str().into(),
                    Val::Int(now_ms()),
                    refs.into(),
                ],
            )?;
            let seq = seq.first().and_then(|r| r.first()).and_then(Val::int).unwrap_or_default();
            compact(db, &key, seq)?;
            db.exec("SELECT pg_notify($1, $2)", &[CHANNEL.into(), seq.to_string().into()])?;
            Ok(seq)
        });
        match written {
            Ok(seq) => {
                tracing::info!(seq, target = %key, "change published to the other replicas");
                Ok(())
            }
            Err(e @ Error::Account(_)) => {
                // Refused by the shared rules: this replica goes back to what the log says.
                drop(guard);
                if let Err(undo) = self.restore(state, &key) {
                    tracing::error!(target = %key, error = %undo.message, "undoing a refused change failed");
                }
                Err(e)
            }
            Err(e) => {
                // A broken connection is made again on the next publish.
                *guard = None;
                Err(e)
            }
        }
    }

    /// Whether the log's latest state of adapter `name` has it (a delete that could not be
    /// published must still be publishable once the adapter is gone here).
    pub fn has_adapter(&self, name: &str) -> Result<bool> {
        let mut db = connect(&self.url)?;
        let latest = latest(&mut db, &format!("adapter:{name}"))?;
        Ok(matches!(latest, Some((_, TargetState::Adapter { version: Some(_), .. }))))
    }

    /// Brings target `key` on this replica to the log's latest state of it (none: as if deleted).
    fn restore(&self, state: &AppState, key: &str) -> std::result::Result<(), ApiError> {
        let mut db = connect(&self.url)?;
        match latest(&mut db, key)? {
            Some((_, change)) => apply(state, &mut db, &change),
            None => match key.split_once(':') {
                Some(("adapter", name)) => {
                    apply(state, &mut db, &TargetState::Adapter { name: name.into(), version: None })
                }
                Some(("slot", slot)) => apply(state, &mut db, &TargetState::Slot { slot: slot.into(), active: None }),
                _ => Ok(()),
            },
        }
    }

    /// Applies the latest change of every target (at start, before the replica serves and
    /// before any act can run): adapters first, then the slots that may name them.
    pub fn catch_up(&self, state: &AppState) -> Result<usize> {
        let mut db = connect(&self.url)?;
        let rows = db.rows(
            "SELECT seq, state, target FROM (SELECT DISTINCT ON (target) seq, state, target FROM shared_changes \
             ORDER BY target, seq DESC) latest ORDER BY (target LIKE 'adapter:%') DESC, seq",
            &[],
        )?;
        let last = rows.iter().filter_map(|r| r.first().and_then(Val::int)).max().unwrap_or_default();
        for row in &rows {
            self.apply_row(state, &mut db, row);
        }
        self.applied.fetch_max(last, Ordering::SeqCst);
        Ok(rows.len())
    }

    /// Applies every change after the last one read, then retries the targets that failed;
    /// returns how many changes it read.
    fn follow(&self, state: &AppState, db: &mut Db) -> Result<usize> {
        let mut n = 0;
        loop {
            let after = self.applied.load(Ordering::SeqCst);
            let rows = db.rows(
                "SELECT seq, state, target FROM shared_changes WHERE seq > $1 ORDER BY seq LIMIT 100",
                &[Val::Int(after)],
            )?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let _serial = self.serial.blocking_lock();
                self.apply_row(state, db, row);
                n += 1;
            }
        }
        let retry: Vec<String> = self.failed.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        for key in retry {
            if let Some((seq, change)) = latest(db, &key)? {
                let _serial = self.serial.blocking_lock();
                let row = [Val::Int(seq), Val::Text(serde_json::to_string(&change).unwrap_or_default()), key.into()];
                self.apply_row(state, db, &row);
            }
        }
        Ok(n)
    }

    /// Applies one row `(seq, state, target)`; a failure is logged and its target tried again.
    fn apply_row(&self, state: &AppState, db: &mut Db, row: &[Val]) {
        let seq = row.first().and_then(Val::int).unwrap_or_default();
        let text = row.get(1).map(Val::string).unwrap_or_default();
        let key = row.get(2).map(Val::string).unwrap_or_default();
        let outcome = match serde_json::from_str::<TargetState>(&text) {
            Ok(change) => {
                let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| apply(state, db, &change)));
                match applied {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.message),
                    Err(_) => Err("applying it panicked".to_string()),
                }
            }
            Err(e) => Err(format!("unreadable: {e}")),
        };
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(()) => {
                failed.remove(&key);
            }
            Err(message) => {
                if failed.insert(key.clone()) {
                    tracing::error!(seq, target = %key, error = %message, "applying a replica's change failed; retrying");
                }
            }
        }
        self.applied.fetch_max(seq, Ordering::SeqCst);
    }

    /// Follows the log on a thread of its own for as long as the server lives: woken by
    /// `NOTIFY`, and every [`POLL`] besides.
    pub fn follow_in_background(self: &Arc<Self>, state: Weak<AppState>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("openlora-replicas".into()).spawn(move || {
            let mut backoff = Duration::from_millis(200);
            while state.strong_count() > 0 {
                match me.listen(&state) {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "following the other replicas' changes failed; reconnecting");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start following the other replicas");
        }
    }

    /// One connection's worth of following; `Ok` once the server is gone.
    fn listen(&self, state: &Weak<AppState>) -> Result<()> {
        let store = |what: &str, e: postgres::Error| Error::io(what.to_string(), std::io::Error::other(e));
        let mut listener = postgres::Client::connect(&self.url, postgres::NoTls).map_err(|e| store("listen", e))?;
        listener.batch_execute(&format!("LISTEN {CHANNEL}")).map_err(|e| store("listen", e))?;
        let mut db = connect(&self.url)?;
        loop {
            let Some(strong) = state.upgrade() else { return Ok(()) };
            self.follow(&strong, &mut db)?;
            drop(strong);
            // Wait for a notification (or the poll interval), then take whatever else came.
            let mut notes = listener.notifications();
            notes.timeout_iter(POLL).next().map_err(|e| store("listen", e))?;
            notes.iter().count().map_err(|e| store("listen", e))?;
        }
    }
}

/// A connection to the shared database that gives up on a statement or a lock rather than
/// hanging every administrative act behind it.
fn connect(url: &str) -> Result<Db> {
    let mut db = Db::postgres(url)?;
    db.batch("SET statement_timeout = '60s'; SET lock_timeout = '15s'")?;
    Ok(db)
}

/// The latest change of target `key` in the log.
fn latest(db: &mut Db, key: &str) -> Result<Option<(i64, TargetState)>> {
    let rows =
        db.rows("SELECT seq, state FROM shared_changes WHERE target = $1 ORDER BY seq DESC LIMIT 1", &[key.into()])?;
    Ok(rows.first().and_then(|r| {
        let seq = r.first().and_then(Val::int)?;
        serde_json::from_str(&r.get(1).map(Val::string).unwrap_or_default()).ok().map(|c| (seq, c))
    }))
}

/// Refuses an owner's adapter `key` that another owner holds in the log, or one more adapter
/// than its quota counted over every replica.
fn check_owner(db: &mut Db, key: &str, me: &str, max_adapters: u64) -> Result<()> {
    if let Some((_, TargetState::Adapter { version: Some(v), name })) = latest(db, key)?
        && v.owner.as_deref() != Some(me)
    {
        return Err(AccountError::Conflict(format!("the adapter name `{name}` is taken; choose another")).into());
    }
    // The owner as the state's JSON writes it, LIKE's wildcards escaped.
    let quoted = serde_json::to_string(me).unwrap_or_default();
    let escaped = quoted.replace('\\', r"\\").replace('%', r"\%").replace('_', r"\_");
    let pattern = format!(r#"%"owner":{escaped}%"#);
    let rows = db.rows(
        "SELECT COUNT(*) FROM (SELECT DISTINCT ON (target) target, state FROM shared_changes \
         WHERE target LIKE 'adapter:%' ORDER BY target, seq DESC) latest WHERE target <> $1 AND state LIKE $2",
        &[key.into(), pattern.into()],
    )?;
    let have = rows.first().and_then(|r| r.first()).and_then(Val::int).unwrap_or_default();
    if have as u64 >= max_adapters {
        return Err(Error::from(AccountError::Quota {
            message: format!("owner `{me}` may have {max_adapters} adapters over all replicas; delete one first"),
            size: false,
            retry_after: None,
        }));
    }
    Ok(())
}

/// Drops the changes of target `key` before `seq` (every replica that has not read them will
/// read `seq`) and the blobs no remaining change names.
fn compact(db: &mut Db, key: &str, seq: i64) -> Result<()> {
    let dropped = db.rows(
        "DELETE FROM shared_changes WHERE target = $1 AND seq < $2 RETURNING blobs",
        &[key.into(), Val::Int(seq)],
    )?;
    let mut shas: BTreeSet<String> = BTreeSet::new();
    for row in dropped {
        shas.extend(row.first().map(Val::string).unwrap_or_default().split_whitespace().map(str::to_string));
    }
    for sha in shas {
        let used =
            db.rows("SELECT 1 FROM shared_changes WHERE strpos(blobs, $1) > 0 LIMIT 1", &[sha.as_str().into()])?;
        if used.is_empty() {
            db.exec("DELETE FROM shared_blobs WHERE sha256 = $1", &[sha.into()])?;
        }
    }
    Ok(())
}

/// A target's state and the blobs it names.
struct TargetStateWithBlobs(TargetState, Vec<(String, Vec<u8>)>);

/// An uploaded adapter's state now, with its files.
fn adapter_state(state: &AppState, name: &str) -> Result<TargetStateWithBlobs> {
    let manifest = state.engine.pager().manifest(name).filter(|_| state.adapter_store.contains(name));
    let Some(m) = manifest else {
        return Ok(TargetStateWithBlobs(TargetState::Adapter { name: name.to_string(), version: None }, Vec::new()));
    };
    let (mut files, mut blobs) = (BTreeMap::new(), Vec::new());
    for entry in std::fs::read_dir(&m.dir).map_err(|e| Error::io(&m.dir, e))? {
        let entry = entry.map_err(|e| Error::io(&m.dir, e))?;
        let Some(file) = entry.file_name().to_str().map(str::to_string) else { continue };
        if !super::upload::wanted(&file) || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let bytes = std::fs::read(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        let sha = sha256_hex(&bytes);
        files.insert(file, sha.clone());
        blobs.push((sha, bytes));
    }
    let version = AdapterVersion { sha256: m.sha256.clone(), owner: m.owner.clone(), files };
    Ok(TargetStateWithBlobs(TargetState::Adapter { name: name.to_string(), version: Some(version) }, blobs))
}

/// A slot's state now, with its active component.
fn slot_state(state: &AppState, slot: &Slot) -> TargetStateWithBlobs {
    let active = state.policy.list().into_iter().find(|v| &v.slot == slot).and_then(|v| {
        let version = v.active?;
        v.versions.into_iter().find(|i| i.version == version)
    });
    let mut blobs = Vec::new();
    let active = active.and_then(|info| {
        let bytes = state.policy.blob(&info.sha256)?;
        blobs.push((info.sha256.clone(), bytes));
        Some(ActivePlugin { sha256: info.sha256, config: info.config })
    });
    TargetStateWithBlobs(TargetState::Slot { slot: slot.to_string(), active }, blobs)
}

fn blob(db: &mut Db, sha256: &str) -> std::result::Result<Vec<u8>, ApiError> {
    let rows = db.rows("SELECT bytes FROM shared_blobs WHERE sha256 = $1", &[sha256.into()])?;
    match rows.into_iter().next().and_then(|r| r.into_iter().next()) {
        Some(Val::Bytes(b)) if sha256_hex(&b) == sha256 => Ok(b),
        _ => Err(ApiError::internal(format!("blob {sha256} is missing or damaged in the shared store"))),
    }
}

/// Brings this replica to `change` (nothing to do when it is there already).
fn apply(state: &AppState, db: &mut Db, change: &TargetState) -> std::result::Result<(), ApiError> {
    match change {
        TargetState::Adapter { name, version: None } => {
            if state.adapter_store.contains(name) {
                super::admin::remove_upload(state, name)?;
            }
            Ok(())
        }
        TargetState::Adapter { name, version: Some(v) } => {
            let here = state.engine.pager().manifest(name).filter(|_| state.adapter_store.contains(name));
            if here.is_some_and(|m| m.sha256 == v.sha256 && m.owner == v.owner) {
                return Ok(());
            }
            let stage = state.adapter_store.stage().map_err(|e| ApiError::internal(e.to_string()))?;
            let written = v.files.iter().try_for_each(|(file, sha)| {
                if !super::upload::wanted(file) {
                    return Err(ApiError::internal(format!("a shared adapter names the file {file:?}")));
                }
                let bytes = blob(db, sha)?;
                std::fs::write(Path::new(&stage).join(file), bytes).map_err(|e| ApiError::internal(e.to_string()))
            });
            if let Err(e) = written {
                let _ = std::fs::remove_dir_all(&stage);
                return Err(e);
            }
            super::admin::store(state, name, &stage, None).map(drop)
        }
        TargetState::Slot { slot, active } => {
            let slot: Slot = slot.parse().map_err(|m: String| ApiError::internal(m))?;
            let here = slot_state(state, &slot).0;
            if let TargetState::Slot { active: ref now, .. } = here
                && now == active
            {
                return Ok(());
            }
            match active {
                None => Ok(state.policy.deactivate(&slot)?),
                Some(p) => {
                    let bytes = match state.policy.blob(&p.sha256) {
                        Some(b) => b,
                        None => blob(db, &p.sha256)?,
                    };
                    state.policy.install(&slot, &bytes, &p.config, "replica").map(drop).map_err(ApiError::from)
                }
            }
        }
    }
}
