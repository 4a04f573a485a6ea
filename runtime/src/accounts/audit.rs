//! The audit trail: one record per administrative act (who, what, which sha256, when, from
//! which key), append-only and chained by sha256 like the ledger's entries, with its head kept
//! beside it so that an edited, removed or reordered record is found by [`verify`].

use serde::{Deserialize, Serialize};

use crate::error::{AccountError, Result};
use crate::ledger::Checkpoint;
use crate::ledger::entry::{GENESIS_HASH, link};
use crate::sql::{Db, Val};

/// What a record says (the part its hash covers, with its place and time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Act {
    /// `operator`, `cli` or `owner:<name>`.
    pub actor: String,
    /// The id of the key it came with (none for the admin token and the CLI).
    pub key_id: Option<String>,
    /// What was done (`adapter.upload`, `plugin.install`, `key.create`, ...).
    pub action: String,
    /// What it was done to (an adapter, a slot, a key id, an owner).
    pub target: String,
    /// The sha256 of what was uploaded or activated, if anything.
    pub sha256: Option<String>,
    /// More (a version number, a scope, quotas).
    pub detail: String,
}

impl Act {
    fn canonical(&self) -> String {
        // Plain strings and options serialize without fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// Its place, from 1.
    pub seq: u64,
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// What was done.
    #[serde(flatten)]
    pub act: Act,
    /// The previous record's hash.
    pub prev_hash: String,
    /// This record's hash.
    pub hash: String,
}

/// The tables, in a backend's integer type.
pub fn schema(bigint: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS audit_log (
            seq {bigint} PRIMARY KEY,
            at_ms {bigint} NOT NULL,
            actor TEXT NOT NULL,
            key_id TEXT,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            sha256 TEXT,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS audit_log_actor ON audit_log (actor, seq);
        CREATE TABLE IF NOT EXISTS audit_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq {bigint} NOT NULL,
            hash TEXT NOT NULL
        );"
    )
}

const COLUMNS: &str = "seq, at_ms, actor, key_id, action, target, sha256, detail, prev_hash, hash";

fn record(r: &[Val]) -> AuditRecord {
    AuditRecord {
        seq: r[0].int().unwrap_or(0).max(0) as u64,
        at_ms: r[1].int().unwrap_or(0).max(0) as u64,
        act: Act {
            actor: r[2].string(),
            key_id: r[3].text().map(str::to_string),
            action: r[4].string(),
            target: r[5].string(),
            sha256: r[6].text().map(str::to_string),
            detail: r[7].string(),
        },
        prev_hash: r[8].string(),
        hash: r[9].string(),
    }
}

fn head(db: &mut Db, lock: bool) -> Result<(u64, String)> {
    let sql = if lock && db.is_postgres() {
        "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE"
    } else {
        "SELECT seq, hash FROM audit_head WHERE id = 1"
    };
    let rows = db.rows(sql, &[])?;
    let row = rows.first().ok_or_else(|| AccountError::Tampered("the head row is missing".into()))?;
    Ok((row[0].int().unwrap_or(0).max(0) as u64, row[1].string()))
}

/// The hash of a record at `seq`, `at_ms` after `prev_hash`.
fn hash_of(prev_hash: &str, seq: u64, at_ms: u64, act: &Act) -> String {
    link(prev_hash, seq, at_ms, &act.canonical())
}

/// Appends one record, chained to the head, in one transaction.
pub fn append(db: &mut Db, act: &Act, at_ms: u64) -> Result<AuditRecord> {
    db.atomically(|db| {
        let (seq, prev) = head(db, true)?;
        let seq = seq + 1;
        let hash = hash_of(&prev, seq, at_ms, act);
        db.exec(
            &format!("INSERT INTO audit_log ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"),
            &[
                seq.into(),
                at_ms.into(),
                act.actor.clone().into(),
                act.key_id.clone().into(),
                act.action.clone().into(),
                act.target.clone().into(),
                act.sha256.clone().into(),
                act.detail.clone().into(),
                prev.clone().into(),
                hash.clone().into(),
            ],
        )?;
        db.exec("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1", &[seq.into(), hash.clone().into()])?;
        Ok(AuditRecord { seq, at_ms, act: act.clone(), prev_hash: prev, hash })
    })
}

/// Records after `after` (by `actor` alone, when given), oldest first, at most `limit`.
pub fn list(db: &mut Db, actor: Option<&str>, since_ms: u64, after: u64, limit: usize) -> Result<Vec<AuditRecord>> {
    let limit = Val::from(limit as u64);
    let rows = match actor {
        Some(a) => db.rows(
            &format!(
                "SELECT {COLUMNS} FROM audit_log WHERE actor = $1 AND at_ms >= $2 AND seq > $3 ORDER BY seq LIMIT $4"
            ),
            &[a.into(), since_ms.into(), after.into(), limit],
        )?,
        None => db.rows(
            &format!("SELECT {COLUMNS} FROM audit_log WHERE at_ms >= $1 AND seq > $2 ORDER BY seq LIMIT $3"),
            &[since_ms.into(), after.into(), limit],
        )?,
    };
    Ok(rows.iter().map(|r| record(r)).collect())
}

/// How many records `actor` made with `action` since `since_ms`, and the oldest's time.
pub fn count_since(db: &mut Db, actor: &str, action: &str, since_ms: u64) -> Result<(u64, Option<u64>)> {
    let rows = db.rows(
        "SELECT COUNT(*), MIN(at_ms) FROM audit_log WHERE actor = $1 AND action = $2 AND at_ms >= $3",
        &[actor.into(), action.into(), since_ms.into()],
    )?;
    let row = rows.first();
    let n = row.and_then(|r| r[0].int()).unwrap_or(0).max(0) as u64;
    Ok((n, row.and_then(|r| r[1].int()).map(|t| t.max(0) as u64)))
}

/// What checking the audit trail found.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// Records checked (up to the first bad one).
    pub records: u64,
    /// The last good record's hash.
    pub head_hash: String,
    /// The record the trusted signed checkpoint names, when there is one and it was checked.
    pub checkpoint: Option<u64>,
    /// Why no signed checkpoint was checked, when none was.
    pub checkpoint_unchecked: Option<String>,
    /// The first problem, if any.
    pub problem: Option<String>,
}

impl AuditReport {
    /// Whether the trail verified.
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// Walks the trail from the first record up to the head read first (records appended meanwhile
/// are left for the next check): each in its place, linked to the one before, with the hash of
/// what it says, ending at the recorded head; then holds it to `signed`, a checkpoint of its
/// head signed outside the database (a trail rewritten with recomputed hashes, or emptied, no
/// longer holds the record it names).
pub fn verify(db: &mut Db, signed: Option<&Checkpoint>) -> Result<AuditReport> {
    let mut report = AuditReport {
        records: 0,
        head_hash: GENESIS_HASH.to_string(),
        checkpoint: None,
        checkpoint_unchecked: None,
        problem: None,
    };
    let (head_seq, head_hash) = head(db, false)?;
    let mut signed_hash = None;
    while report.records < head_seq {
        let page = list(db, None, 0, report.records, 500.min((head_seq - report.records) as usize))?;
        if page.is_empty() {
            break;
        }
        for r in page {
            let expected = report.records + 1;
            let problem = if r.seq != expected {
                Some(format!("record {expected} is missing (found {} next)", r.seq))
            } else if r.prev_hash != report.head_hash {
                Some(format!("record {} does not link to the record before it", r.seq))
            } else if r.hash != hash_of(&r.prev_hash, r.seq, r.at_ms, &r.act) {
                Some(format!("record {} was changed: its hash does not match what it says", r.seq))
            } else {
                None
            };
            if problem.is_some() {
                report.problem = problem;
                return Ok(report);
            }
            if signed.is_some_and(|c| c.seq == r.seq) {
                signed_hash = Some(r.hash.clone());
            }
            report.records = r.seq;
            report.head_hash = r.hash;
        }
    }
    if head_seq != report.records || head_hash != report.head_hash {
        report.problem = Some(format!(
            "the recorded head is record {head_seq}, but the trail ends at record {} (records were removed)",
            report.records
        ));
        return Ok(report);
    }
    if let Some(c) = signed {
        report.checkpoint = Some(c.seq);
        if c.seq > report.records {
            report.problem = Some(format!(
                "a signed checkpoint names record {}, but the trail ends at record {} (records were removed)",
                c.seq, report.records
            ));
        } else if signed_hash.as_deref() != Some(c.hash.as_str()) {
            report.problem =
                Some(format!("record {} is not the one its signed checkpoint names (the trail was rewritten)", c.seq));
        }
    }
    Ok(report)
}
