//! The shared ledger: PostgreSQL, so that many replicas write one chain. Appends lock the head
//! row (`SELECT ... FOR UPDATE`), so replicas take turns and never chain from the same head.

use postgres::{Client, GenericClient, NoTls, Row};

use super::chain::{COLUMNS, ChainTx, append_chained, schema};
use super::checkpoint::Checkpoint;
use super::entry::{GENESIS_HASH, NewEntry, StoredEntry};
use super::store::{Appended, Filter, Head, LedgerStore};
use super::totals::{self, SummaryRow, TotalRow, TotalsQuery};
use crate::error::{Error, LedgerError, Result};

/// A ledger in a PostgreSQL database.
pub struct PostgresStore {
    client: Client,
}

fn err(e: postgres::Error) -> Error {
    LedgerError::Store { what: "postgres".into(), source: Box::new(e) }.into()
}

fn entry(r: &Row) -> StoredEntry {
    StoredEntry {
        seq: r.get::<_, i64>(0) as u64,
        request_key: r.get(1),
        tenant: r.get(2),
        adapter: r.get(3),
        recorded_at_ms: r.get::<_, i64>(4) as u64,
        body: r.get(5),
        prev_hash: r.get(6),
        hash: r.get(7),
    }
}

fn read_head(c: &mut impl GenericClient, lock: bool) -> Result<Head> {
    let sql = if lock {
        "SELECT seq, hash FROM ledger_head WHERE id = 1 FOR UPDATE"
    } else {
        "SELECT seq, hash FROM ledger_head WHERE id = 1"
    };
    let r = c.query_one(sql, &[]).map_err(err)?;
    Ok(Head { seq: r.get::<_, i64>(0) as u64, hash: r.get(1) })
}

fn read_by_key(c: &mut impl GenericClient, key: &str) -> Result<Option<StoredEntry>> {
    let sql = format!("SELECT {COLUMNS} FROM ledger_entries WHERE request_key = $1");
    Ok(c.query_opt(&sql, &[&key]).map_err(err)?.as_ref().map(entry))
}

impl PostgresStore {
    /// Connects and creates the tables if needed.
    pub fn open(url: &str) -> Result<Self> {
        let mut client = Client::connect(url, NoTls).map_err(err)?;
        // Several replicas may start at once: create the schema under one advisory lock.
        let mut tx = client.transaction().map_err(err)?;
        tx.execute("SELECT pg_advisory_xact_lock(7271727)", &[]).map_err(err)?;
        tx.batch_execute(&schema("BIGINT", "BYTEA")).map_err(err)?;
        tx.execute(
            "INSERT INTO ledger_head (id, seq, hash) VALUES (1, 0, $1) ON CONFLICT DO NOTHING",
            &[&GENESIS_HASH],
        )
        .map_err(err)?;
        backfill_totals(&mut tx)?;
        tx.commit().map_err(err)?;
        Ok(PostgresStore { client })
    }
}

struct Tx<'a> {
    tx: postgres::Transaction<'a>,
}

impl ChainTx for Tx<'_> {
    fn head(&mut self) -> Result<Head> {
        read_head(&mut self.tx, true)
    }

    fn by_keys(&mut self, keys: &[&str]) -> Result<Vec<StoredEntry>> {
        let sql = format!("SELECT {COLUMNS} FROM ledger_entries WHERE request_key = ANY($1)");
        Ok(self.tx.query(&sql, &[&keys]).map_err(err)?.iter().map(entry).collect())
    }

    fn insert(&mut self, entries: &[StoredEntry]) -> Result<()> {
        // One multi-row INSERT per commit (at most 256 entries × 8 parameters).
        let mut sql = format!("INSERT INTO ledger_entries ({COLUMNS}) VALUES ");
        let mut params: Vec<Box<dyn postgres::types::ToSql + Sync>> = Vec::with_capacity(entries.len() * 8);
        for (i, e) in entries.iter().enumerate() {
            let b = i * 8;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7,
                b + 8
            ));
            params.push(Box::new(e.seq as i64));
            params.push(Box::new(e.request_key.clone()));
            params.push(Box::new(e.tenant.clone()));
            params.push(Box::new(e.adapter.clone()));
            params.push(Box::new(e.recorded_at_ms as i64));
            params.push(Box::new(e.body.clone()));
            params.push(Box::new(e.prev_hash.clone()));
            params.push(Box::new(e.hash.clone()));
        }
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
        self.tx.execute(&sql, &refs).map(drop).map_err(err)
    }

    fn put_blob(&mut self, sha256: &str, bytes: &[u8]) -> Result<()> {
        self.tx
            .execute(
                "INSERT INTO plugin_blobs (sha256, bytes) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&sha256, &bytes],
            )
            .map(drop)
            .map_err(err)
    }

    fn set_head(&mut self, head: &Head) -> Result<()> {
        self.tx
            .execute("UPDATE ledger_head SET seq = $1, hash = $2 WHERE id = 1", &[&(head.seq as i64), &head.hash])
            .map(drop)
            .map_err(err)
    }

    fn add_totals(&mut self, rows: &[TotalRow]) -> Result<()> {
        add_totals(&mut self.tx, rows)
    }
}

/// Adds counts to the running totals, in one statement per thousand rows (one round trip).
fn add_totals(c: &mut impl GenericClient, rows: &[TotalRow]) -> Result<()> {
    for chunk in rows.chunks(1000) {
        let sql = totals::upsert(chunk.len(), |i| format!("${i}"));
        let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = Vec::with_capacity(chunk.len() * 10);
        for r in chunk {
            params.extend([
                &r.day as &(dyn postgres::types::ToSql + Sync),
                &r.tenant,
                &r.grouping,
                &r.key,
                &r.currency,
                &r.requests,
                &r.amount_hi,
                &r.amount_lo,
                &r.prompt_tokens,
                &r.completion_tokens,
            ]);
        }
        c.execute(&sql, &params).map_err(err)?;
    }
    Ok(())
}

/// Fills the running totals from the entries when they are empty but the chain is not (a
/// ledger written before totals were kept); the caller holds the schema lock.
fn backfill_totals(tx: &mut postgres::Transaction<'_>) -> Result<()> {
    let have: i64 = tx.query_one("SELECT COUNT(*) FROM ledger_totals", &[]).map_err(err)?.get(0);
    if have > 0 || read_head(tx, true)?.seq == 0 {
        return Ok(());
    }
    let mut after = 0i64;
    loop {
        let sql = format!("SELECT {COLUMNS} FROM ledger_entries WHERE seq > $1 ORDER BY seq LIMIT 1000");
        let page: Vec<StoredEntry> = tx.query(&sql, &[&after]).map_err(err)?.iter().map(entry).collect();
        let Some(last) = page.last() else { return Ok(()) };
        after = last.seq as i64;
        let bodies: Vec<(u64, super::entry::EntryBody)> = page
            .iter()
            .map(|e| Ok((e.recorded_at_ms, e.parse().map_err(LedgerError::Invalid)?)))
            .collect::<Result<_>>()?;
        add_totals(tx, &totals::rows(bodies.iter().map(|(t, b)| (*t, b))))?;
    }
}

impl LedgerStore for PostgresStore {
    fn totals(&mut self, q: &TotalsQuery<'_>) -> Result<Vec<SummaryRow>> {
        // The tenant's type cannot be inferred from `IS NULL`: it is said.
        let placeholder = |i: usize| if i == 2 { "$2::TEXT".to_string() } else { format!("${i}") };
        let sql = totals::query(if q.by_tenant { "tenant" } else { "key" }, placeholder, "::BIGINT");
        let rows = self.client.query(&sql, &[&q.grouping, &q.tenant, &q.days.0, &q.days.1]).map_err(err)?;
        Ok(rows
            .iter()
            .map(|r| SummaryRow {
                key: r.get(0),
                currency: r.get(1),
                requests: r.get::<_, i64>(2) as u64,
                amount: totals::amount(r.get(3), r.get(4)),
                prompt_tokens: r.get::<_, i64>(5) as u64,
                completion_tokens: r.get::<_, i64>(6) as u64,
            })
            .collect())
    }

    fn append(&mut self, entries: &[NewEntry], recorded_at_ms: u64) -> Result<Vec<Appended>> {
        let tx = self.client.transaction().map_err(err)?;
        let mut t = Tx { tx };
        let out = append_chained(&mut t, entries, recorded_at_ms)?;
        t.tx.commit().map_err(err)?;
        Ok(out)
    }

    fn by_key(&mut self, request_key: &str) -> Result<Option<StoredEntry>> {
        read_by_key(&mut self.client, request_key)
    }

    fn page(&mut self, filter: &Filter, after: u64, limit: usize) -> Result<Vec<StoredEntry>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM ledger_entries WHERE seq > $1 AND recorded_at_ms >= $2 AND recorded_at_ms < $3 \
             AND ($4::TEXT IS NULL OR tenant = $4) ORDER BY seq LIMIT $5"
        );
        let until = filter.until_ms.map_or(i64::MAX, |u| u.min(i64::MAX as u64) as i64);
        let rows = self
            .client
            .query(
                &sql,
                &[
                    &(after as i64),
                    &(filter.since_ms.unwrap_or(0).min(i64::MAX as u64) as i64),
                    &until,
                    &filter.tenant,
                    &(limit.min(i64::MAX as usize) as i64),
                ],
            )
            .map_err(err)?;
        Ok(rows.iter().map(entry).collect())
    }

    fn head(&mut self) -> Result<Head> {
        read_head(&mut self.client, false)
    }

    fn blob(&mut self, sha256: &str) -> Result<Option<Vec<u8>>> {
        let r = self.client.query_opt("SELECT bytes FROM plugin_blobs WHERE sha256 = $1", &[&sha256]).map_err(err)?;
        Ok(r.map(|r| r.get(0)))
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn put_checkpoint(&mut self, c: &Checkpoint) -> Result<()> {
        self.client
            .execute(
                "INSERT INTO ledger_checkpoints (seq, hash, signed_at_ms, public_key, signature) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO UPDATE SET hash = EXCLUDED.hash, \
                 signed_at_ms = EXCLUDED.signed_at_ms, public_key = EXCLUDED.public_key, signature = EXCLUDED.signature",
                &[&(c.seq as i64), &c.hash, &(c.signed_at_ms as i64), &c.public_key, &c.signature],
            )
            .map(drop)
            .map_err(err)
    }

    fn checkpoints(&mut self) -> Result<Vec<Checkpoint>> {
        let rows = self
            .client
            .query("SELECT seq, hash, signed_at_ms, public_key, signature FROM ledger_checkpoints ORDER BY seq", &[])
            .map_err(err)?;
        Ok(rows
            .iter()
            .map(|r| Checkpoint {
                seq: r.get::<_, i64>(0) as u64,
                hash: r.get(1),
                signed_at_ms: r.get::<_, i64>(2) as u64,
                public_key: r.get(3),
                signature: r.get(4),
            })
            .collect())
    }

    #[cfg(test)]
    fn rewrite(&mut self, entries: &[StoredEntry], head: &Head) -> Result<()> {
        let tx = self.client.transaction().map_err(err)?;
        let mut t = Tx { tx };
        t.tx.execute("DELETE FROM ledger_entries", &[]).map_err(err)?;
        t.insert(entries)?;
        t.set_head(head)?;
        t.tx.commit().map_err(err)
    }
}
