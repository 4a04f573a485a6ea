//! `explain`: how one entry's charge was computed and split, every micro-unit of it, with a
//! check that its hash holds and that its recorded deciders give the same again.

use openlora_sdk::{Money, RequestInfo, Split, Usage};
use serde::Serialize;

use super::chain::COLUMNS;
use super::entry::{Artifact, Decider, OwnerShare, StoredEntry, link};
use super::verify::{BlobSource, Replay};
use crate::error::Result;
use crate::sql::{Db, Val};

/// The replay check of one entry.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayCheck {
    /// Whether the replay gave the recorded charge, splits and owner's share.
    pub ok: bool,
    /// The charge the replay gave.
    pub charge: Option<Money>,
    /// The splits the replay gave.
    pub splits: Option<Vec<Split>>,
    /// What differed, or why it could not run.
    pub problem: Option<String>,
}

/// One entry, explained.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The request's id.
    pub request_id: String,
    /// Its place in the ledger.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
    /// Whether the hash is that of what the entry says.
    pub hash_ok: bool,
    /// The tenant.
    pub tenant: String,
    /// How it ended.
    pub outcome: &'static str,
    /// The finish reason.
    pub finish: String,
    /// The base model.
    pub base_model: Artifact,
    /// The adapter, if any.
    pub adapter: Option<Artifact>,
    /// The adapter's owner, if any.
    pub adapter_owner: Option<String>,
    /// The request as the plugins saw it.
    pub request: RequestInfo,
    /// The usage the pricer saw.
    pub usage: Usage,
    /// Who decided (configurations by sha256 only).
    pub deciders: Vec<Decider>,
    /// The pricer's charge.
    pub charge: Money,
    /// The operator's attributor's split, the owner's share as one split.
    pub operator_split: Vec<Split>,
    /// The owner's share.
    pub owner_share: Option<OwnerShare>,
    /// The owner's division of its share.
    pub owner_split: Option<Vec<Split>>,
    /// The entry's splits.
    pub splits: Vec<Split>,
    /// The replay check.
    pub replay: ReplayCheck,
}

/// Explains an entry, replaying it with `replayer` (its blobs read from `blobs`).
pub fn explain(
    stored: &StoredEntry,
    replayer: &mut dyn Replay,
    blobs: BlobSource<'_>,
) -> std::result::Result<Explanation, String> {
    let body = stored.parse()?;
    let hash_ok = stored.hash == link(&stored.prev_hash, stored.seq, stored.recorded_at_ms, &stored.body);
    let replay = match replayer.settle(&body.request, &body.usage, &body.deciders, blobs) {
        _ if body.charge.amount == 0 && body.splits.is_empty() => {
            ReplayCheck { ok: true, charge: Some(body.charge.clone()), splits: Some(Vec::new()), problem: None }
        }
        Err(m) => ReplayCheck { ok: false, charge: None, splits: None, problem: Some(format!("replay failed: {m}")) },
        Ok(got) => {
            let problem = if got.charge != body.charge {
                Some("the replay's charge differs from the entry's".to_string())
            } else if got.splits != body.splits {
                Some("the replay's splits differ from the entry's".to_string())
            } else if body.format >= 3 && got.owner_share != body.owner_share {
                Some("the replay's owner share differs from the entry's".to_string())
            } else {
                None
            };
            ReplayCheck { ok: problem.is_none(), charge: Some(got.charge), splits: Some(got.splits), problem }
        }
    };
    let deciders = body
        .deciders
        .iter()
        .map(|d| Decider {
            config: None,
            config_sha256: d
                .config_sha256
                .clone()
                .or_else(|| d.config.as_deref().filter(|c| !c.is_empty()).map(sha256_text)),
            ..d.clone()
        })
        .collect();
    Ok(Explanation {
        request_id: body.request_id.clone(),
        seq: stored.seq,
        hash: stored.hash.clone(),
        hash_ok,
        tenant: body.tenant.clone(),
        outcome: body.outcome.as_str(),
        finish: body.finish.clone(),
        base_model: body.base_model.clone(),
        adapter: body.adapter.clone(),
        adapter_owner: body.request.adapter_owner.clone(),
        operator_split: body.operator_splits(),
        owner_split: body.owner_splits().map(<[Split]>::to_vec),
        owner_share: body.owner_share.clone(),
        request: body.request,
        usage: body.usage,
        deciders,
        charge: body.charge,
        splits: body.splits,
        replay,
    })
}

fn sha256_text(text: &str) -> String {
    use sha2::{Digest, Sha256};
    super::entry::hex(&Sha256::digest(text.as_bytes()))
}

fn money(amount: u64, currency: &str) -> String {
    format!("{amount} µ{currency} ({}.{:06} {currency})", amount / 1_000_000, amount % 1_000_000)
}

/// The explanation as text for people.
pub fn text(e: &Explanation) -> String {
    let c = &e.charge.currency;
    let mut out = format!("request {} (ledger entry {}, {})\n", e.request_id, e.seq, e.outcome);
    out += &format!("  tenant: {}\n", e.tenant);
    out += &format!("  base model: {} (sha256 {})\n", e.base_model.name, e.base_model.sha256);
    if let Some(a) = &e.adapter {
        out += &format!(
            "  adapter: {} (sha256 {}), owner {}\n",
            a.name,
            a.sha256,
            e.adapter_owner.as_deref().unwrap_or("none")
        );
    }
    let u = &e.usage;
    out += &format!(
        "usage the pricer saw: {} prompt + {} completion tokens, {} steps, {} ms of compute, finish `{}`\n",
        u.prompt_tokens, u.completion_tokens, u.steps, u.compute_ms, e.finish
    );
    out += "deciders:\n";
    for d in &e.deciders {
        out += &format!(
            "  {:<12} {} version {} config {} fuel {}{}\n",
            d.slot,
            d.plugin,
            d.version.map_or("-".into(), |v| v.to_string()),
            d.config_sha256.as_deref().unwrap_or("none"),
            d.fuel,
            d.failure.as_deref().map(|f| format!(" FAILED ({f}); the built-in answered")).unwrap_or_default()
        );
    }
    out += &format!("charge (the pricer): {}\n", money(e.charge.amount, c));
    out += "the operator's attributor split it:\n";
    for s in &e.operator_split {
        out += &format!("  {:<28} {:>24}  {}\n", s.payee, money(s.amount, c), s.reason);
    }
    if let (Some(share), Some(division)) = (&e.owner_share, &e.owner_split) {
        out += &format!("the owner's attributor divided {}'s share of {}:\n", share.payee, money(share.amount, c));
        for s in division {
            out += &format!("  {:<28} {:>24}  {}\n", s.payee, money(s.amount, c), s.reason);
        }
    }
    let total: u128 = e.splits.iter().map(|s| u128::from(s.amount)).sum();
    out += &format!("splits sum to {total} µ{c} of a {} µ{c} charge\n", e.charge.amount);
    out +=
        &format!("hash: {} ({})\n", e.hash, if e.hash_ok { "matches the entry" } else { "DOES NOT match the entry" });
    match &e.replay.problem {
        None => out += "replay: ok (the recorded deciders give the same charge and splits again)\n",
        Some(p) => out += &format!("replay: FAILED: {p}\n"),
    }
    out
}

/// An entry's row, in [`COLUMNS`]' order.
fn stored_entry(r: Vec<Val>) -> StoredEntry {
    let int = |v: &Val| v.int().unwrap_or(0).max(0) as u64;
    StoredEntry {
        seq: int(&r[0]),
        request_key: r[1].string(),
        tenant: r[2].string(),
        adapter: r[3].text().map(str::to_string),
        recorded_at_ms: int(&r[4]),
        body: r[5].string(),
        prev_hash: r[6].string(),
        hash: r[7].string(),
    }
}

/// The entry of request `request_id`, if the ledger holds one (by its request key, or, for a
/// request with an idempotency key, by its body).
pub fn find(db: &mut Db, request_id: &str) -> Result<Option<StoredEntry>> {
    let mut rows = db.rows(
        &format!("SELECT {COLUMNS} FROM ledger_entries WHERE request_key = $1"),
        &[format!("req:{request_id}").into()],
    )?;
    if rows.is_empty() && request_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        let pattern = format!("%\"request_id\":\"{request_id}\"%");
        rows = db.rows(
            &format!(
                "SELECT {COLUMNS} FROM ledger_entries WHERE request_key LIKE 'idem:%' AND body LIKE $1 ORDER BY seq"
            ),
            &[pattern.into()],
        )?;
    }
    let entries = rows.into_iter().map(stored_entry);
    // The body's own request id decides (the text search may match a metadata value).
    Ok(entries.into_iter().find(|e| e.parse().is_ok_and(|b| b.request_id == request_id)))
}

/// Plugin and configuration bytes from the ledger's database.
pub fn blob(db: &mut Db, sha256: &str) -> Result<Option<Vec<u8>>> {
    let rows = db.rows("SELECT bytes FROM plugin_blobs WHERE sha256 = $1", &[sha256.into()])?;
    Ok(rows.into_iter().next().and_then(|r| match r.into_iter().next() {
        Some(Val::Bytes(b)) => Some(b),
        Some(Val::Text(t)) => Some(t.into_bytes()),
        _ => None,
    }))
}

/// The latest `limit` entries of `adapter` written in `since_ms..until_ms` (oldest first).
pub fn latest_of_adapter(
    db: &mut Db,
    adapter: &str,
    (since_ms, until_ms): (Option<u64>, Option<u64>),
    limit: usize,
) -> Result<Vec<StoredEntry>> {
    let rows = db.rows(
        &format!(
            "SELECT {COLUMNS} FROM ledger_entries WHERE adapter = $1 AND recorded_at_ms >= $2 AND recorded_at_ms < $3 \
             ORDER BY seq DESC LIMIT $4"
        ),
        &[
            adapter.into(),
            since_ms.unwrap_or(0).into(),
            until_ms.unwrap_or(i64::MAX as u64).into(),
            (limit as u64).into(),
        ],
    )?;
    let mut v: Vec<StoredEntry> = rows.into_iter().map(stored_entry).collect();
    v.reverse();
    Ok(v)
}
