//! The attribution ledger: one entry per request that did work, hash-chained, exact to the
//! micro-unit, idempotent by request key, written durably before the client is told what it
//! was charged, and verifiable later by replaying each entry's pricer and attributor.
//!
//! Two backends behind [`LedgerStore`]: SQLite (default, a file under the data directory) and
//! PostgreSQL (many replicas, one chain). [`Ledger`] is the server's front: one writer thread
//! that commits whatever entries are waiting in one transaction (group commit), a reader
//! connection for queries, and the idempotency keys of requests in flight.

mod chain;
pub mod entry;
pub mod postgres;
pub mod report;
pub mod sqlite;
pub mod store;
pub mod verify;

#[cfg(test)]
mod suite;

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;

pub use entry::{Artifact, Decider, EntryBody, NewEntry, Outcome, StoredEntry};
pub use store::{Appended, Filter, Head, LedgerStore, Location};
pub use verify::{Replay, Replayed};

use crate::error::{Error, LedgerError, Result};
use crate::metrics::LedgerMetrics;

/// Most entries one commit writes.
const MAX_BATCH: usize = 256;
/// Most entries waiting for the writer before appends block.
const QUEUE: usize = 4096;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct Job {
    entry: NewEntry,
    reply: SyncSender<Result<Appended>>,
}

/// The server's ledger: group-committing writer, reader, and idempotency keys in flight.
pub struct Ledger {
    location: Location,
    jobs: SyncSender<Job>,
    reader: Mutex<Option<Box<dyn LedgerStore>>>,
    in_flight: DashMap<String, ()>,
    stored_blobs: DashMap<String, ()>,
    metrics: LedgerMetrics,
}

/// What the ledger knows about an idempotency key a request wants to use.
pub enum KeyState {
    /// Nobody has it: it is held for this request until the guard is dropped.
    Free(KeyGuard),
    /// Another request with the same key is running now.
    InFlight,
    /// A request with this key already has an entry.
    Done(Box<StoredEntry>),
}

/// Holds a request key while its request runs.
pub struct KeyGuard {
    ledger: Arc<Ledger>,
    key: String,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.ledger.in_flight.remove(&self.key);
    }
}

impl Ledger {
    /// Opens the ledger (creating it if needed) and starts its writer thread.
    pub fn open(location: Location, metrics: LedgerMetrics) -> Result<Arc<Self>> {
        let writer_store = location.open()?;
        let reader = location.open()?;
        let (jobs, rx) = sync_channel(QUEUE);
        let (loc, m) = (location.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("openlora-ledger".into())
            .spawn(move || write_loop(loc, Some(writer_store), rx, m))
            .map_err(|e| Error::io("ledger writer thread", e))?;
        Ok(Arc::new(Ledger {
            location,
            jobs,
            reader: Mutex::new(Some(reader)),
            in_flight: DashMap::new(),
            stored_blobs: DashMap::new(),
            metrics,
        }))
    }

    /// Where the ledger lives.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Writes one entry durably (blocking until it is committed) and returns it, or the entry
    /// already holding its request key. Any failure is counted.
    pub fn append(&self, entry: NewEntry) -> Result<Appended> {
        let blobs: Vec<String> = entry.blobs.iter().map(|(sha, _)| sha.clone()).collect();
        let (reply, answer) = sync_channel(1);
        let result = self
            .jobs
            .send(Job { entry, reply })
            .map_err(|_| Error::from(LedgerError::WriterStopped))
            .and_then(|_| answer.recv().map_err(|_| Error::from(LedgerError::WriterStopped))?);
        match &result {
            Ok(Appended::Written(_)) => {
                for sha in blobs {
                    self.stored_blobs.insert(sha, ());
                }
            }
            Ok(Appended::Duplicate(_)) => {}
            Err(_) => self.metrics.write_failures.inc(),
        }
        result
    }

    /// Whether an entry naming this plugin must carry its bytes (not yet stored by this process).
    pub fn needs_blob(&self, sha256: &str) -> bool {
        !self.stored_blobs.contains_key(sha256)
    }

    /// Takes a request key for a request about to run, unless it is running or done already.
    pub fn reserve(self: &Arc<Self>, key: &str) -> Result<KeyState> {
        if self.in_flight.insert(key.to_string(), ()).is_some() {
            return Ok(KeyState::InFlight);
        }
        let guard = KeyGuard { ledger: self.clone(), key: key.to_string() };
        match self.read(|s| s.by_key(key))? {
            Some(entry) => Ok(KeyState::Done(Box::new(entry))),
            None => Ok(KeyState::Free(guard)),
        }
    }

    /// Runs a query on the reader connection (reconnecting after a failure).
    pub fn read<T>(&self, f: impl FnOnce(&mut dyn LedgerStore) -> Result<T>) -> Result<T> {
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        if reader.is_none() {
            *reader = Some(self.location.open()?);
        }
        let store = reader.as_mut().ok_or_else(|| LedgerError::Invalid("no reader".into()))?;
        let result = f(store.as_mut());
        if result.is_err() {
            *reader = None;
        }
        result
    }
}

/// The writer: takes every entry waiting (up to [`MAX_BATCH`]), commits them in one
/// transaction, answers each; reconnects after a failure.
fn write_loop(location: Location, mut store: Option<Box<dyn LedgerStore>>, rx: Receiver<Job>, m: LedgerMetrics) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (entries, replies): (Vec<NewEntry>, Vec<_>) = jobs.into_iter().map(|j| (j.entry, j.reply)).unzip();
        let t0 = Instant::now();
        let result = match store.as_mut() {
            Some(s) => s.append(&entries, now_ms()),
            None => location.open().and_then(|mut s| {
                let r = s.append(&entries, now_ms());
                store = Some(s);
                r
            }),
        };
        match result {
            Ok(out) => {
                m.commit_seconds.observe(t0.elapsed().as_secs_f64());
                m.batch_entries.observe(entries.len() as f64);
                for ((entry, reply), appended) in entries.iter().zip(replies).zip(out) {
                    match &appended {
                        Appended::Written(_) => m.entries.with_label_values(&[entry.body.outcome.as_str()]).inc(),
                        Appended::Duplicate(_) => m.duplicates.inc(),
                    }
                    let _ = reply.send(Ok(appended));
                }
            }
            Err(e) => {
                tracing::error!(entries = entries.len(), error = %e, "ledger write failed");
                store = None;
                for reply in replies {
                    let _ = reply
                        .send(Err(LedgerError::Store { what: "write".into(), source: e.to_string().into() }.into()));
                }
            }
        }
    }
}

impl Location {
    /// Opens (creating if needed) the ledger.
    pub fn open(&self) -> Result<Box<dyn LedgerStore>> {
        Ok(match self {
            Location::Sqlite(path) => Box::new(sqlite::SqliteStore::open(path)?),
            Location::Postgres(url) => Box::new(postgres::PostgresStore::open(url)?),
        })
    }
}
