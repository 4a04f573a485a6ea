//! The embedded ledger: one SQLite file (WAL, `synchronous=FULL`), the default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::chain::{COLUMNS, ChainTx, append_chained, schema};
use super::checkpoint::Checkpoint;
use super::entry::{GENESIS_HASH, NewEntry, StoredEntry};
use super::store::{Appended, Filter, Head, LedgerStore};
use super::totals::{self, SummaryRow, TotalRow, TotalsQuery};
use crate::error::{Error, LedgerError, Result};

/// A ledger in an SQLite file.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

fn err(path: &Path, e: rusqlite::Error) -> Error {
    LedgerError::Store { what: format!("sqlite {}", path.display()), source: Box::new(e) }.into()
}

fn row(r: &Row<'_>) -> rusqlite::Result<StoredEntry> {
    Ok(StoredEntry {
        seq: r.get::<_, i64>(0)? as u64,
        request_key: r.get(1)?,
        tenant: r.get(2)?,
        adapter: r.get(3)?,
        recorded_at_ms: r.get::<_, i64>(4)? as u64,
        body: r.get(5)?,
        prev_hash: r.get(6)?,
        hash: r.get(7)?,
    })
}

fn read_head(conn: &Connection, path: &Path) -> Result<Head> {
    conn.query_row("SELECT seq, hash FROM ledger_head WHERE id = 1", [], |r| {
        Ok(Head { seq: r.get::<_, i64>(0)? as u64, hash: r.get(1)? })
    })
    .map_err(|e| err(path, e))
}

fn read_by_key(conn: &Connection, path: &Path, key: &str) -> Result<Option<StoredEntry>> {
    conn.query_row(&format!("SELECT {COLUMNS} FROM ledger_entries WHERE request_key = ?1"), [key], row)
        .optional()
        .map_err(|e| err(path, e))
}

impl SqliteStore {
    /// Opens or creates the ledger file (and its folder).
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let conn = Connection::open(path).map_err(|e| err(path, e))?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(|e| err(path, e))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| err(path, e))?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(|e| err(path, e))?;
        conn.execute_batch(&schema("INTEGER", "BLOB")).map_err(|e| err(path, e))?;
        conn.execute("INSERT OR IGNORE INTO ledger_head (id, seq, hash) VALUES (1, 0, ?1)", params![GENESIS_HASH])
            .map_err(|e| err(path, e))?;
        let mut conn = conn;
        backfill_totals(&mut conn, path)?;
        Ok(SqliteStore { conn, path: path.to_path_buf() })
    }
}

struct Tx<'a> {
    tx: rusqlite::Transaction<'a>,
    path: &'a Path,
}

impl ChainTx for Tx<'_> {
    fn head(&mut self) -> Result<Head> {
        read_head(&self.tx, self.path)
    }

    fn by_keys(&mut self, keys: &[&str]) -> Result<Vec<StoredEntry>> {
        let mut found = Vec::new();
        for key in keys {
            found.extend(read_by_key(&self.tx, self.path, key)?);
        }
        Ok(found)
    }

    fn insert(&mut self, entries: &[StoredEntry]) -> Result<()> {
        let sql = format!("INSERT INTO ledger_entries ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)");
        let mut stmt = self.tx.prepare_cached(&sql).map_err(|e| err(self.path, e))?;
        for e in entries {
            stmt.execute(params![
                e.seq as i64,
                e.request_key,
                e.tenant,
                e.adapter,
                e.recorded_at_ms as i64,
                e.body,
                e.prev_hash,
                e.hash
            ])
            .map_err(|e| err(self.path, e))?;
        }
        Ok(())
    }

    fn put_blob(&mut self, sha256: &str, bytes: &[u8]) -> Result<()> {
        self.tx
            .execute("INSERT OR IGNORE INTO plugin_blobs (sha256, bytes) VALUES (?1, ?2)", params![sha256, bytes])
            .map(drop)
            .map_err(|e| err(self.path, e))
    }

    fn set_head(&mut self, head: &Head) -> Result<()> {
        self.tx
            .execute("UPDATE ledger_head SET seq = ?1, hash = ?2 WHERE id = 1", params![head.seq as i64, head.hash])
            .map(drop)
            .map_err(|e| err(self.path, e))
    }

    fn add_totals(&mut self, rows: &[TotalRow]) -> Result<()> {
        add_totals(&self.tx, self.path, rows)
    }
}

fn add_totals(conn: &Connection, path: &Path, rows: &[TotalRow]) -> Result<()> {
    let mut stmt = conn.prepare_cached(&totals::upsert(1, |i| format!("?{i}"))).map_err(|e| err(path, e))?;
    for r in rows {
        stmt.execute(params![
            r.day,
            r.tenant,
            r.grouping,
            r.key,
            r.currency,
            r.requests,
            r.amount_hi,
            r.amount_lo,
            r.prompt_tokens,
            r.completion_tokens
        ])
        .map_err(|e| err(path, e))?;
    }
    Ok(())
}

/// Fills the running totals from the entries when they are empty but the chain is not (a
/// ledger written before totals were kept), under the write lock.
fn backfill_totals(conn: &mut Connection, path: &Path) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| err(path, e))?;
    let have: i64 = tx.query_row("SELECT COUNT(*) FROM ledger_totals", [], |r| r.get(0)).map_err(|e| err(path, e))?;
    if have == 0 && read_head(&tx, path)?.seq > 0 {
        let mut after = 0i64;
        loop {
            let page: Vec<StoredEntry> = {
                let sql = format!("SELECT {COLUMNS} FROM ledger_entries WHERE seq > ?1 ORDER BY seq LIMIT 1000");
                let mut stmt = tx.prepare_cached(&sql).map_err(|e| err(path, e))?;
                let rows = stmt.query_map([after], row).map_err(|e| err(path, e))?;
                rows.collect::<rusqlite::Result<_>>().map_err(|e| err(path, e))?
            };
            let Some(last) = page.last() else { break };
            after = last.seq as i64;
            let bodies: Vec<(u64, super::entry::EntryBody)> = page
                .iter()
                .map(|e| Ok((e.recorded_at_ms, e.parse().map_err(LedgerError::Invalid)?)))
                .collect::<Result<_>>()?;
            add_totals(&tx, path, &totals::rows(bodies.iter().map(|(t, b)| (*t, b))))?;
        }
    }
    tx.commit().map_err(|e| err(path, e))
}

impl LedgerStore for SqliteStore {
    fn append(&mut self, entries: &[NewEntry], recorded_at_ms: u64) -> Result<Vec<Appended>> {
        let path = self.path.clone();
        // IMMEDIATE takes the write lock first, so two writers never chain from the same head.
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| err(&path, e))?;
        let mut t = Tx { tx, path: &path };
        let out = append_chained(&mut t, entries, recorded_at_ms)?;
        t.tx.commit().map_err(|e| err(&path, e))?;
        Ok(out)
    }

    fn by_key(&mut self, request_key: &str) -> Result<Option<StoredEntry>> {
        read_by_key(&self.conn, &self.path, request_key)
    }

    fn page(&mut self, filter: &Filter, after: u64, limit: usize) -> Result<Vec<StoredEntry>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM ledger_entries WHERE seq > ?1 AND recorded_at_ms >= ?2 AND recorded_at_ms < ?3 \
             AND (?4 IS NULL OR tenant = ?4) ORDER BY seq LIMIT ?5"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| err(&self.path, e))?;
        let rows = stmt
            .query_map(
                params![
                    after as i64,
                    filter.since_ms.unwrap_or(0) as i64,
                    filter.until_ms.map_or(i64::MAX, |u| u.min(i64::MAX as u64) as i64),
                    filter.tenant,
                    limit.min(i64::MAX as usize) as i64
                ],
                row,
            )
            .map_err(|e| err(&self.path, e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| err(&self.path, e))
    }

    fn head(&mut self) -> Result<Head> {
        read_head(&self.conn, &self.path)
    }

    fn blob(&mut self, sha256: &str) -> Result<Option<Vec<u8>>> {
        self.conn
            .query_row("SELECT bytes FROM plugin_blobs WHERE sha256 = ?1", [sha256], |r| r.get(0))
            .optional()
            .map_err(|e| err(&self.path, e))
    }

    fn totals(&mut self, q: &TotalsQuery<'_>) -> Result<Vec<SummaryRow>> {
        let sql = totals::query(if q.by_tenant { "tenant" } else { "key" }, |i| format!("?{i}"), "");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| err(&self.path, e))?;
        let rows = stmt
            .query_map(params![q.grouping, q.tenant, q.days.0, q.days.1], |r| {
                Ok(SummaryRow {
                    key: r.get(0)?,
                    currency: r.get(1)?,
                    requests: r.get::<_, i64>(2)? as u64,
                    amount: totals::amount(r.get(3)?, r.get(4)?),
                    prompt_tokens: r.get::<_, i64>(5)? as u64,
                    completion_tokens: r.get::<_, i64>(6)? as u64,
                })
            })
            .map_err(|e| err(&self.path, e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| err(&self.path, e))
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn put_checkpoint(&mut self, c: &Checkpoint) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO ledger_checkpoints (seq, hash, signed_at_ms, public_key, signature) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![c.seq as i64, c.hash, c.signed_at_ms as i64, c.public_key, c.signature],
            )
            .map(drop)
            .map_err(|e| err(&self.path, e))
    }

    fn checkpoints(&mut self) -> Result<Vec<Checkpoint>> {
        let sql = "SELECT seq, hash, signed_at_ms, public_key, signature FROM ledger_checkpoints ORDER BY seq";
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| err(&self.path, e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Checkpoint {
                    seq: r.get::<_, i64>(0)? as u64,
                    hash: r.get(1)?,
                    signed_at_ms: r.get::<_, i64>(2)? as u64,
                    public_key: r.get(3)?,
                    signature: r.get(4)?,
                })
            })
            .map_err(|e| err(&self.path, e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| err(&self.path, e))
    }

    #[cfg(test)]
    fn rewrite(&mut self, entries: &[StoredEntry], head: &Head) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| err(&path, e))?;
        tx.execute("DELETE FROM ledger_entries", []).map_err(|e| err(&path, e))?;
        let mut t = Tx { tx, path: &path };
        t.insert(entries)?;
        t.set_head(head)?;
        t.tx.commit().map_err(|e| err(&path, e))
    }
}
