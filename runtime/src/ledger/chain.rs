//! Appending to a hash chain inside one backend transaction: the logic both backends share.

use std::collections::HashMap;

use super::entry::{NewEntry, StoredEntry, link};
use super::store::{Appended, Head};
use super::totals::{self, TotalRow};
use crate::error::Result;

/// The tables of a ledger, in a backend's integer and byte-string types: the entries (the
/// chain), the recorded head (one row), plugin bytes by sha256, signed checkpoints, and the
/// running totals.
pub fn schema(bigint: &str, bytes: &str) -> String {
    tables(bigint, bytes) + &totals::schema(bigint)
}

fn tables(bigint: &str, bytes: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS ledger_entries (
            seq {bigint} PRIMARY KEY,
            request_key TEXT NOT NULL UNIQUE,
            tenant TEXT NOT NULL,
            adapter TEXT,
            recorded_at_ms {bigint} NOT NULL,
            body TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS ledger_entries_tenant ON ledger_entries (tenant, seq);
        CREATE INDEX IF NOT EXISTS ledger_entries_time ON ledger_entries (recorded_at_ms);
        CREATE INDEX IF NOT EXISTS ledger_entries_adapter ON ledger_entries (adapter, seq);
        CREATE TABLE IF NOT EXISTS ledger_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq {bigint} NOT NULL,
            hash TEXT NOT NULL
        );
        CREATE TABLE IF NOT EXISTS plugin_blobs (
            sha256 TEXT PRIMARY KEY,
            bytes {bytes} NOT NULL
        );
        CREATE TABLE IF NOT EXISTS ledger_checkpoints (
            seq {bigint} PRIMARY KEY,
            hash TEXT NOT NULL,
            signed_at_ms {bigint} NOT NULL,
            public_key TEXT NOT NULL,
            signature TEXT NOT NULL
        );"
    )
}

/// The columns of an entry row, in [`super::entry::StoredEntry`]'s order.
pub const COLUMNS: &str = "seq, request_key, tenant, adapter, recorded_at_ms, body, prev_hash, hash";

/// The operations an append needs inside one open transaction (the head is locked by then).
pub trait ChainTx {
    /// The recorded head.
    fn head(&mut self) -> Result<Head>;
    /// The entries already holding any of these request keys.
    fn by_keys(&mut self, keys: &[&str]) -> Result<Vec<StoredEntry>>;
    /// Inserts entries, in order.
    fn insert(&mut self, entries: &[StoredEntry]) -> Result<()>;
    /// Stores plugin bytes unless already present.
    fn put_blob(&mut self, sha256: &str, bytes: &[u8]) -> Result<()>;
    /// Records the new head.
    fn set_head(&mut self, head: &Head) -> Result<()>;
    /// Adds counts to the running totals.
    fn add_totals(&mut self, rows: &[TotalRow]) -> Result<()>;
}

/// Appends `entries` in order after the head, skipping (and reporting) request keys already in
/// the ledger or earlier in the same batch. One lookup and one insert per batch, so a backend
/// across a network pays two round trips per commit, not two per entry. The caller commits.
pub fn append_chained(tx: &mut dyn ChainTx, entries: &[NewEntry], recorded_at_ms: u64) -> Result<Vec<Appended>> {
    let mut head = tx.head()?;
    let keys: Vec<&str> = entries.iter().map(|e| e.body.request_key.as_str()).collect();
    let mut known: HashMap<String, StoredEntry> =
        tx.by_keys(&keys)?.into_iter().map(|e| (e.request_key.clone(), e)).collect();
    let mut out = Vec::with_capacity(entries.len());
    let mut written = Vec::new();
    let mut written_bodies = Vec::new();
    for e in entries {
        let key = e.body.request_key.as_str();
        if let Some(prior) = known.get(key) {
            out.push(Appended::Duplicate(prior.clone()));
            continue;
        }
        for (sha, bytes) in &e.blobs {
            tx.put_blob(sha, bytes)?;
        }
        let seq = head.seq + 1;
        let hash = link(&head.hash, seq, recorded_at_ms, &e.canonical);
        let stored = StoredEntry {
            seq,
            request_key: key.to_string(),
            tenant: e.body.tenant.clone(),
            adapter: e.body.adapter.as_ref().map(|a| a.name.clone()),
            recorded_at_ms,
            body: e.canonical.clone(),
            prev_hash: head.hash.clone(),
            hash: hash.clone(),
        };
        head = Head { seq, hash };
        known.insert(key.to_string(), stored.clone());
        out.push(Appended::Written(stored.clone()));
        written.push(stored);
        written_bodies.push(&e.body);
    }
    if !written.is_empty() {
        tx.insert(&written)?;
        tx.set_head(&head)?;
        tx.add_totals(&totals::rows(written_bodies.into_iter().map(|b| (recorded_at_ms, b))))?;
    }
    Ok(out)
}
