//! `openlora ledger verify`: walks the chain from the first entry, checking each entry's place,
//! its link to the one before, its hash, its exactness and (optionally) that replaying its
//! pricer and attributor gives the same charge and splits. Stops at the first bad entry.

use std::collections::BTreeMap;

use openlora_sdk::{Money, RequestInfo, Split, Usage};
use serde::Serialize;

use super::checkpoint::{Checkpoint, Trust};
use super::entry::{Decider, EntryBody, GENESIS_HASH, StoredEntry, link};
use super::store::{Filter, LedgerStore};
use crate::error::Result;

/// Finds stored plugin bytes by sha256 (hex).
pub type BlobSource<'a> = &'a mut dyn FnMut(&str) -> Result<Option<Vec<u8>>>;

/// The settlement a replay produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// The charge.
    pub charge: Money,
    /// The splits.
    pub splits: Vec<Split>,
    /// The adapter owner's share and where its division sits.
    pub owner_share: Option<super::entry::OwnerShare>,
}

/// Runs an entry's recorded pricer and attributor again on its recorded inputs. The policy
/// host implements it; the ledger only stores what a replay needs.
pub trait Replay {
    /// The charge and splits the recorded deciders give for the recorded request and usage.
    fn settle(
        &mut self,
        request: &RequestInfo,
        usage: &Usage,
        deciders: &[Decider],
        blobs: BlobSource<'_>,
    ) -> std::result::Result<Replayed, String>;
}

/// Entries read per query while verifying.
const PAGE: usize = 500;

/// What verification found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Where the ledger is.
    pub ledger: String,
    /// Entries checked (up to the first bad one).
    pub entries: u64,
    /// Entries whose settlement was replayed and matched.
    pub replayed: u64,
    /// The last good entry's hash.
    pub head_hash: String,
    /// The first problem, if any.
    pub first_bad: Option<Problem>,
    /// Signed checkpoints the chain was checked against (valid signatures by the trusted key).
    pub checkpoints_checked: u64,
    /// The latest of them.
    pub latest_checkpoint: Option<u64>,
    /// Why checkpoints were not checked, when they were not (no public key to trust).
    pub checkpoints_unchecked: Option<String>,
}

impl VerifyReport {
    /// Whether the ledger verified.
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// The first bad entry and what is wrong with it.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// Its sequence number (for a missing tail: the head's).
    pub seq: u64,
    /// Its request id, when its body could be read.
    pub request_id: Option<String>,
    /// What is wrong.
    pub problem: String,
}

/// Checks one entry against the one before it; returns its parsed body.
fn check_entry(e: &StoredEntry, expected_seq: u64, prev_hash: &str) -> std::result::Result<EntryBody, String> {
    if e.seq != expected_seq {
        return Err(format!("expected entry {expected_seq} here, found {} (an entry was removed or moved)", e.seq));
    }
    if e.prev_hash != prev_hash {
        return Err("its prev_hash is not the previous entry's hash (entries removed, inserted or reordered)".into());
    }
    if link(&e.prev_hash, e.seq, e.recorded_at_ms, &e.body) != e.hash {
        return Err("its hash does not match its contents (the entry was changed)".into());
    }
    let body = e.parse()?;
    if body.canonical() != e.body {
        return Err("its body is not in canonical form (the entry was changed)".into());
    }
    if body.request_key != e.request_key
        || body.tenant != e.tenant
        || body.adapter.as_ref().map(|a| &a.name) != e.adapter.as_ref()
    {
        return Err("its indexed columns do not match its body (the entry was changed)".into());
    }
    body.check().map_err(|m| format!("it is not exact: {m}"))?;
    Ok(body)
}

/// Replays one entry's settlement; `None` if it matches.
fn replay(r: &mut dyn Replay, store: &mut dyn LedgerStore, body: &EntryBody) -> Option<String> {
    if body.charge.amount == 0 && body.splits.is_empty() {
        return None;
    }
    let mut blobs = |sha: &str| store.blob(sha);
    match r.settle(&body.request, &body.usage, &body.deciders, &mut blobs) {
        Err(m) => Some(format!("replay failed: {m}")),
        Ok(got) if got.charge != body.charge => {
            Some(format!("replay charges {:?} but the entry records {:?}", got.charge, body.charge))
        }
        Ok(got) if got.splits != body.splits => {
            Some(format!("replay splits {:?} but the entry records {:?}", got.splits, body.splits))
        }
        Ok(got) if body.format >= 3 && got.owner_share != body.owner_share => Some(format!(
            "replay gives the owner's share {:?} but the entry records {:?}",
            got.owner_share, body.owner_share
        )),
        Ok(_) => None,
    }
}

/// Verifies the whole ledger; with a replayer, also replays every entry's settlement. No
/// checkpoint is judged (see [`verify_with`]).
pub fn verify(store: &mut dyn LedgerStore, replayer: Option<&mut dyn Replay>, ledger: &str) -> Result<VerifyReport> {
    verify_with(store, replayer, ledger, &Trust::default())
}

/// The checkpoints to hold the chain to: those in the ledger and those known from outside it,
/// each signed by the trusted key (a bad signature is itself a problem).
fn signed_checkpoints(
    store: &mut dyn LedgerStore,
    trust: &Trust,
    report: &mut VerifyReport,
) -> Result<std::result::Result<BTreeMap<u64, Checkpoint>, Problem>> {
    let mut all = store.checkpoints()?;
    all.extend(trust.outside.iter().cloned());
    let Some(key) = &trust.key else {
        if !all.is_empty() {
            report.checkpoints_unchecked =
                Some("no public key to check the ledger's checkpoints against (give --public-key)".into());
        }
        return Ok(Ok(BTreeMap::new()));
    };
    let mut good: BTreeMap<u64, Checkpoint> = BTreeMap::new();
    for c in all {
        if let Err(m) = c.verify(key) {
            return Ok(Err(Problem {
                seq: c.seq,
                request_id: None,
                problem: format!("the checkpoint of entry {} is forged: {m}", c.seq),
            }));
        }
        if let Some(other) = good.get(&c.seq)
            && other.hash != c.hash
        {
            return Ok(Err(Problem {
                seq: c.seq,
                request_id: None,
                problem: format!("two checkpoints of entry {} sign different hashes", c.seq),
            }));
        }
        good.insert(c.seq, c);
    }
    report.checkpoints_checked = good.len() as u64;
    report.latest_checkpoint = good.keys().next_back().copied();
    Ok(Ok(good))
}

/// Verifies the whole ledger against `trust`'s checkpoints too: a rewrite of any entry at or
/// before a checkpoint (even with the chain recomputed after it), or a cut of the tail behind
/// one, contradicts its signature.
pub fn verify_with(
    store: &mut dyn LedgerStore,
    mut replayer: Option<&mut dyn Replay>,
    ledger: &str,
    trust: &Trust,
) -> Result<VerifyReport> {
    let mut report = VerifyReport {
        ledger: ledger.to_string(),
        entries: 0,
        replayed: 0,
        head_hash: GENESIS_HASH.to_string(),
        first_bad: None,
        checkpoints_checked: 0,
        latest_checkpoint: None,
        checkpoints_unchecked: None,
    };
    let checkpoints = match signed_checkpoints(store, trust, &mut report)? {
        Ok(c) => c,
        Err(p) => {
            report.first_bad = Some(p);
            return Ok(report);
        }
    };
    let mut last = 0u64;
    loop {
        let page = store.page(&Filter::default(), last, PAGE)?;
        if page.is_empty() {
            break;
        }
        for e in &page {
            let bad = |problem: String, request_id: Option<String>| Problem { seq: e.seq, request_id, problem };
            let checked = check_entry(e, report.entries + 1, &report.head_hash).and_then(|b| match checkpoints.get(&e.seq) {
                Some(c) if c.hash != e.hash => Err(format!(
                    "it contradicts the checkpoint signed at {} ms: the signed hash of entry {} is {}, the chain's is {} \
                     (entries at or before it were rewritten)",
                    c.signed_at_ms, c.seq, c.hash, e.hash
                )),
                _ => Ok(b),
            });
            let body = match checked {
                Ok(b) => b,
                Err(m) => {
                    let id = e.parse().ok().map(|b| b.request_id);
                    report.first_bad = Some(bad(m, id));
                    return Ok(report);
                }
            };
            if let Some(r) = replayer.as_deref_mut() {
                if let Some(m) = replay(r, store, &body) {
                    report.first_bad = Some(bad(m, Some(body.request_id)));
                    return Ok(report);
                }
                report.replayed += 1;
            }
            report.entries += 1;
            report.head_hash = e.hash.clone();
            last = e.seq;
        }
    }
    if let Some((_, c)) = checkpoints.iter().next_back()
        && c.seq > report.entries
    {
        report.first_bad = Some(Problem {
            seq: c.seq,
            request_id: None,
            problem: format!(
                "the chain ends at entry {} but entry {} was signed at {} ms (entries cut from the end)",
                report.entries, c.seq, c.signed_at_ms
            ),
        });
        return Ok(report);
    }
    let head = store.head()?;
    if head.seq != report.entries || head.hash != report.head_hash {
        report.first_bad = Some(Problem {
            seq: head.seq,
            request_id: None,
            problem: format!(
                "the ledger's head records entry {} but the chain ends at entry {} (entries removed from the end)",
                head.seq, report.entries
            ),
        });
    }
    Ok(report)
}
