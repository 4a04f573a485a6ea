//! The attribution ledger: one entry per request that did work, hash-chained, exact to the
//! micro-unit, idempotent by request key, written durably before the client is told what it
//! was charged, and verifiable later by replaying each entry's pricer and attributor.
//!
//! Two backends behind [`LedgerStore`]: SQLite (default, a file under the data directory) and
//! PostgreSQL (many replicas, one chain). [`Ledger`] is the server's front: one writer thread
//! that commits whatever entries are waiting in one transaction (group commit), a reader
//! connection for queries, and the idempotency keys of requests in flight.

mod chain;
pub mod checkpoint;
pub mod earnings;
pub mod entry;
pub mod explain;
pub mod postgres;
pub mod report;
pub mod sqlite;
pub mod store;
pub mod totals;
pub mod verify;
mod writer;

#[cfg(test)]
mod suite;

use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;

pub use checkpoint::{Checkpoint, Trust};
pub use entry::{Artifact, Decider, EntryBody, NewEntry, Outcome, StoredEntry, now_ms};
pub use store::{Appended, Filter, Head, LedgerStore, Location};
pub use verify::{Replay, Replayed};
pub use writer::Signer;
use writer::{Job, write_loop};

use crate::error::{Error, LedgerError, Result};
use crate::metrics::LedgerMetrics;

/// Most entries waiting for the writer before appends block.
const QUEUE: usize = 4096;

/// The server's ledger: group-committing writer, reader, and idempotency keys in flight.
pub struct Ledger {
    location: Location,
    jobs: SyncSender<Job>,
    reader: Mutex<Option<Box<dyn LedgerStore>>>,
    /// Reports (usage, summaries) read on a connection of their own: a flood of them never
    /// delays the idempotency lookups requests make on `reader`.
    reports: Mutex<Option<Box<dyn LedgerStore>>>,
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
    /// Opens the ledger (creating it if needed) and starts its writer thread; no checkpoints
    /// are signed.
    pub fn open(location: Location, metrics: LedgerMetrics) -> Result<Arc<Self>> {
        Self::open_signed(location, metrics, None)
    }

    /// Opens the ledger and starts its writer thread, which signs a checkpoint of the head with
    /// `signer` every `signer.every` entries (and when [`Ledger::checkpoint`] asks).
    pub fn open_signed(location: Location, metrics: LedgerMetrics, signer: Option<Signer>) -> Result<Arc<Self>> {
        let writer_store = location.open()?;
        let reader = location.open()?;
        let (jobs, rx) = sync_channel(QUEUE);
        let (loc, m) = (location.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("openlora-ledger".into())
            .spawn(move || write_loop(loc, Some(writer_store), rx, m, signer))
            .map_err(|e| Error::io("ledger writer thread", e))?;
        Ok(Arc::new(Ledger {
            location,
            jobs,
            reader: Mutex::new(Some(reader)),
            reports: Mutex::new(None),
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
            .send(Job::Append { entry, reply })
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

    /// Signs a checkpoint of the head now (as the server does at shutdown), after every entry
    /// handed to [`Ledger::append`] before it; `None` when this ledger signs none.
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>> {
        let (reply, answer) = sync_channel(1);
        self.jobs.send(Job::Checkpoint { reply }).map_err(|_| Error::from(LedgerError::WriterStopped))?;
        answer.recv().map_err(|_| Error::from(LedgerError::WriterStopped))?
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
        self.on(&self.reader, f)
    }

    /// Runs a report's query (usage, summaries) on the reports' own connection.
    pub fn report<T>(&self, f: impl FnOnce(&mut dyn LedgerStore) -> Result<T>) -> Result<T> {
        self.on(&self.reports, f)
    }

    fn on<T>(
        &self,
        connection: &Mutex<Option<Box<dyn LedgerStore>>>,
        f: impl FnOnce(&mut dyn LedgerStore) -> Result<T>,
    ) -> Result<T> {
        let mut reader = connection.lock().unwrap_or_else(|p| p.into_inner());
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

impl Location {
    /// A plain connection to the ledger's database, for the queries [`crate::sql`] runs.
    pub fn connect(&self) -> Result<crate::sql::Db> {
        match self {
            Location::Sqlite(path) => crate::sql::Db::sqlite(path),
            Location::Postgres(url) => crate::sql::Db::postgres(url),
        }
    }

    /// Opens (creating if needed) the ledger.
    pub fn open(&self) -> Result<Box<dyn LedgerStore>> {
        Ok(match self {
            Location::Sqlite(path) => Box::new(sqlite::SqliteStore::open(path)?),
            Location::Postgres(url) => Box::new(postgres::PostgresStore::open(url)?),
        })
    }
}
