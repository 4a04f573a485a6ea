//! The one trait both ledger backends implement, and how a ledger location is opened.

use std::path::PathBuf;

use super::checkpoint::Checkpoint;
pub use super::entry::Head;
use super::entry::{NewEntry, StoredEntry};
use super::totals::{SummaryRow, TotalsQuery};
use crate::error::{LedgerError, Result};

/// What became of one entry handed to [`LedgerStore::append`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Written, durably, as this entry.
    Written(StoredEntry),
    /// The ledger already holds an entry with the same request key: nothing was written.
    Duplicate(StoredEntry),
}

impl Appended {
    /// The entry in the ledger, new or existing.
    pub fn entry(&self) -> &StoredEntry {
        match self {
            Appended::Written(e) | Appended::Duplicate(e) => e,
        }
    }
}

/// Which entries a query reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only entries written at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Only entries written before this time (ms since the epoch).
    pub until_ms: Option<u64>,
    /// Only this tenant's entries.
    pub tenant: Option<String>,
    /// Only entries served by this adapter (checked by [`Filter::admits`] as entries are read).
    pub adapter: Option<String>,
    /// Only entries on adapters of this owner, as recorded at the time (checked by
    /// [`Filter::admits`]).
    pub owner: Option<String>,
}

impl Filter {
    /// Whether an entry passes the adapter and owner conditions (a store's `page` applies the
    /// time and tenant ones; [`super::report::for_each`] applies both).
    pub fn admits(&self, body: &super::entry::EntryBody) -> bool {
        let adapter = body.adapter.as_ref().map(|a| a.name.as_str());
        self.adapter.as_deref().is_none_or(|want| adapter == Some(want))
            && self.owner.as_deref().is_none_or(|want| body.request.adapter_owner.as_deref() == Some(want))
    }

    /// Whether only the time and tenant conditions are set (the ones running totals can answer).
    pub fn by_time_and_tenant_only(&self) -> bool {
        self.adapter.is_none() && self.owner.is_none()
    }
}

/// A ledger backend: an append-only, hash-chained table of entries plus the plugin bytes the
/// entries name. Appends are atomic per call: every entry of the batch is written, or none.
pub trait LedgerStore: Send {
    /// Appends entries in order in one transaction, chaining each to the previous one; an entry
    /// whose request key is already present is not written (reported as a duplicate).
    fn append(&mut self, entries: &[NewEntry], recorded_at_ms: u64) -> Result<Vec<Appended>>;
    /// The entry with this request key, if any.
    fn by_key(&mut self, request_key: &str) -> Result<Option<StoredEntry>>;
    /// Up to `limit` entries with `seq > after`, in order, matching the filter.
    fn page(&mut self, filter: &Filter, after: u64, limit: usize) -> Result<Vec<StoredEntry>>;
    /// The recorded head.
    fn head(&mut self) -> Result<Head>;
    /// The plugin bytes with this sha256 (hex), if stored.
    fn blob(&mut self, sha256: &str) -> Result<Option<Vec<u8>>>;
    /// The running totals a summary asks for, grouped and sorted by key and currency.
    fn totals(&mut self, query: &TotalsQuery<'_>) -> Result<Vec<SummaryRow>>;
    /// Which backend this is (`sqlite`, `postgres`).
    fn kind(&self) -> &'static str;
    /// Stores a signed checkpoint (replacing one of the same sequence number).
    fn put_checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<()>;
    /// Every stored checkpoint, oldest first.
    fn checkpoints(&mut self) -> Result<Vec<Checkpoint>>;
    /// Replaces the whole chain and head, as someone writing the database directly could (for
    /// the tests that show such rewrites are caught).
    #[cfg(test)]
    fn rewrite(&mut self, entries: &[StoredEntry], head: &Head) -> Result<()>;
}

/// Where a ledger lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection string (`postgres://...` or `host=... dbname=...`).
    Postgres(String),
}

impl Location {
    /// Parses `sqlite:<path>`, `postgres://...` / `postgresql://...`, or a plain file path.
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        if text.is_empty() {
            return Err(LedgerError::Invalid("empty ledger location".into()).into());
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(Location::Postgres(text.to_string()));
        }
        Ok(Location::Sqlite(PathBuf::from(text.strip_prefix("sqlite:").unwrap_or(text))))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            Location::Postgres(url) => write!(f, "{}", redact(url)),
        }
    }
}

/// A connection string with any password replaced by `***`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_hide_passwords() {
        assert_eq!(Location::parse("sqlite:/x/l.db").unwrap(), Location::Sqlite("/x/l.db".into()));
        assert_eq!(Location::parse("/x/l.db").unwrap(), Location::Sqlite("/x/l.db".into()));
        let pg = Location::parse("postgres://u:secret@h:5/db").unwrap();
        assert_eq!(pg.to_string(), "postgres://u:***@h:5/db");
        assert!(Location::parse(" ").is_err());
    }
}
