//! What one ledger entry holds, its canonical bytes, and how entries are chained by hash.

use std::time::{SystemTime, UNIX_EPOCH};

use openlora_sdk::money::{validate_currency, validate_splits};
use openlora_sdk::{Money, RequestInfo, Split, Usage};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The last entry of a ledger, as recorded beside the chain (so that deleting the last entry
/// is detected too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    /// Its sequence number (0: empty).
    pub seq: u64,
    /// Its hash ([`GENESIS_HASH`] when empty).
    pub hash: String,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Who made one decision, recorded with it so it can be replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decider {
    /// The slot (`router`, `pricer`, `attributor`, `adapter:<name>`).
    pub slot: String,
    /// `sha256:<hex>` of the plugin that answered, or `builtin:<slot>@<version>`.
    pub plugin: String,
    /// The plugin's version number in its slot (none for the built-in).
    pub version: Option<u32>,
    /// The configuration it ran with, inline (format 1 entries only; later formats name it by
    /// `config_sha256` and the ledger stores each distinct configuration once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// The sha256 (hex) of the configuration it ran with (JSON), stored once in the ledger;
    /// absent when it ran with none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// If the slot's plugin failed and the built-in answered instead: why.
    pub failure: Option<String>,
    /// Fuel the plugin used (0 for the built-in).
    pub fuel: u64,
}

/// The `prev_hash` of the first entry of a ledger.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Version of the entry format, recorded in every entry. Format 1 carried each decider's
/// configuration inline; format 2 names it by sha256; format 3 records the adapter owner's share
/// ([`OwnerShare`]).
pub const ENTRY_FORMAT: u32 = 3;

/// The adapter owner's share as the operator's attributor paid it, and where the owner's own
/// attributor's division of it sits among the entry's splits (`count` 1 and the same split when
/// the owner has no attributor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerShare {
    /// The owner's account (`owner:<name>`).
    pub payee: String,
    /// The share, in the charge's currency.
    pub amount: u64,
    /// The reason the operator's attributor gave.
    pub reason: String,
    /// The index of the division's first split.
    pub first: usize,
    /// How many splits the division has.
    pub count: usize,
}

/// How a request that did work ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It finished (end of sequence, stop string, or `max_tokens`).
    Completed,
    /// The client went away or cancelled after tokens were produced.
    Cancelled,
    /// It failed after compute was spent; it is recorded with a zero charge.
    Failed,
}

impl Outcome {
    /// The name used in metrics and exports.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
        }
    }
}

/// A model or adapter as the entry names it: its name and the sha256 of its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// The name it is served under.
    pub name: String,
    /// sha256 (hex) of its files, see [`crate::model::content_hash`].
    pub sha256: String,
}

/// Everything recorded about one request; its canonical JSON is what the hash chain covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryBody {
    /// Entry format version ([`ENTRY_FORMAT`]).
    pub format: u32,
    /// The server's request id.
    pub request_id: String,
    /// The key that makes the request unique: `idem:<tenant>:<Idempotency-Key>` or `req:<request id>`.
    pub request_key: String,
    /// The tenant the request belongs to.
    pub tenant: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The engine's finish reason (`stop`, `length`, `cancelled`, ...), or the failure.
    pub finish: String,
    /// The base model.
    pub base_model: Artifact,
    /// The adapter, if one served it.
    pub adapter: Option<Artifact>,
    /// The request exactly as the policy plugins saw it (the replay input).
    pub request: RequestInfo,
    /// What it used (the replay input).
    pub usage: Usage,
    /// What it costs.
    pub charge: Money,
    /// Who is paid; sums to the charge exactly.
    pub splits: Vec<Split>,
    /// Who decided: router, pricer, attributor, then any adapter owner's attributor.
    pub deciders: Vec<Decider>,
    /// When the request finished, milliseconds since the Unix epoch.
    pub finished_at_ms: u64,
    /// The adapter owner's share and its division (format 3 on; absent when the operator's
    /// attributor paid the owner nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_share: Option<OwnerShare>,
}

impl EntryBody {
    /// The splits the operator's attributor gave: the owner's division folded back into the
    /// one split it divided.
    pub fn operator_splits(&self) -> Vec<Split> {
        let Some(o) = &self.owner_share else { return self.splits.clone() };
        let mut v = self.splits.clone();
        let end = (o.first + o.count).min(v.len());
        v.splice(o.first.min(end)..end, [Split::new(o.payee.clone(), o.amount, o.reason.clone())]);
        v
    }

    /// The owner's division of its share (none without a recorded share).
    pub fn owner_splits(&self) -> Option<&[Split]> {
        let o = self.owner_share.as_ref()?;
        self.splits.get(o.first..o.first.checked_add(o.count)?)
    }

    /// The canonical bytes the hash covers: compact JSON, fields in declaration order.
    pub fn canonical(&self) -> String {
        // Serializing plain structs, vectors and strings cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks the entry is exact before it is written: splits sum to the charge in integer
    /// micro-units (a zero charge may have no splits), currencies are valid, keys are present.
    pub fn check(&self) -> Result<(), String> {
        if self.request_key.is_empty() || self.request_id.is_empty() {
            return Err("request id and key must not be empty".into());
        }
        validate_currency(&self.charge.currency)?;
        if self.format >= 2 && self.deciders.iter().any(|d| d.config.is_some()) {
            return Err("from format 2 on, a decider names its configuration by sha256 only".into());
        }
        if let Some(o) = &self.owner_share {
            let sum =
                self.owner_splits().filter(|s| !s.is_empty()).map(|s| s.iter().map(|x| u128::from(x.amount)).sum());
            if self.format < 3 || sum != Some(u128::from(o.amount)) {
                return Err("the owner's share is not the sum of its division".into());
            }
        }
        if self.charge.amount == 0 && self.splits.is_empty() {
            return Ok(());
        }
        if self.outcome == Outcome::Failed && self.charge.amount != 0 {
            return Err("a failed request is recorded with a zero charge".into());
        }
        validate_splits(&self.charge, &self.splits)
    }

    /// The sha256 (hex) of every wasm plugin that decided (`sha256:<hex>` deciders).
    pub fn plugin_hashes(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.deciders.iter().filter_map(|d| d.plugin.strip_prefix("sha256:")).map(str::to_string).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The sha256 (hex) of every configuration a decider ran with.
    pub fn config_hashes(&self) -> Vec<String> {
        let mut v: Vec<String> = self.deciders.iter().filter_map(|d| d.config_sha256.clone()).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// One stored entry: its place in the chain and its canonical body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// Position in the ledger, from 1.
    pub seq: u64,
    /// The request key (unique in the ledger).
    pub request_key: String,
    /// The tenant (an index of the body's field).
    pub tenant: String,
    /// The adapter name, if any (an index of the body's field).
    pub adapter: Option<String>,
    /// When it was written, milliseconds since the Unix epoch.
    pub recorded_at_ms: u64,
    /// The canonical JSON of the [`EntryBody`].
    pub body: String,
    /// The previous entry's hash ([`GENESIS_HASH`] for the first).
    pub prev_hash: String,
    /// This entry's hash: [`link`] of the fields above.
    pub hash: String,
}

impl StoredEntry {
    /// Parses the body.
    pub fn parse(&self) -> Result<EntryBody, String> {
        serde_json::from_str(&self.body).map_err(|e| format!("entry {}: body is not a valid entry: {e}", self.seq))
    }
}

/// The hash that chains an entry to the one before it: sha256 over the previous hash, the
/// sequence number, the write time and the canonical body, each length-delimited.
pub fn link(prev_hash: &str, seq: u64, recorded_at_ms: u64, body: &str) -> String {
    let mut h = Sha256::new();
    for part in [prev_hash.as_bytes(), &seq.to_be_bytes(), &recorded_at_ms.to_be_bytes(), body.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    hex(&h.finalize())
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An entry ready to be written: its body (already checked), and the bytes of any plugin or
/// configuration the ledger may not hold yet.
#[derive(Debug, Clone)]
pub struct NewEntry {
    /// The body.
    pub body: EntryBody,
    /// Its canonical JSON.
    pub canonical: String,
    /// `(sha256, bytes)` of plugins and configurations to store with it (kept once,
    /// content-addressed).
    pub blobs: Vec<(String, Vec<u8>)>,
}

impl NewEntry {
    /// Checks a body and prepares it for writing.
    pub fn new(body: EntryBody, blobs: Vec<(String, Vec<u8>)>) -> Result<Self, String> {
        body.check()?;
        Ok(NewEntry { canonical: body.canonical(), body, blobs })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid body for request `n`, split between two payees.
    pub fn sample_body(n: u64) -> EntryBody {
        EntryBody {
            format: ENTRY_FORMAT,
            request_id: format!("req-{n}"),
            request_key: format!("req:req-{n}"),
            tenant: if n.is_multiple_of(2) { "acme".into() } else { "globex".into() },
            outcome: Outcome::Completed,
            finish: "stop".into(),
            base_model: Artifact { name: "tiny".into(), sha256: "ab".repeat(32) },
            adapter: Some(Artifact { name: "startrek".into(), sha256: "cd".repeat(32) }),
            request: openlora_sdk::testing::sample_request(),
            usage: openlora_sdk::testing::sample_usage(),
            charge: Money::new(1000 + n, "USD"),
            splits: vec![Split::new("base:tiny", 600, "base"), Split::new("owner:trekkie", 400 + n, "adapter")],
            deciders: Vec::new(),
            finished_at_ms: 1_700_000_000_000 + n,
            owner_share: None,
        }
    }

    #[test]
    fn canonical_json_round_trips_exactly() {
        let b = sample_body(3);
        let text = b.canonical();
        let back: EntryBody = serde_json::from_str(&text).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.canonical(), text);
    }

    #[test]
    fn format_one_entries_keep_their_inline_configuration() {
        let text =
            r#"{"slot":"pricer","plugin":"builtin:pricer@1","version":null,"config":"{}","failure":null,"fuel":0}"#;
        let d: Decider = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), text, "format 1 bytes are reproduced exactly");
        let mut body = sample_body(1);
        body.deciders.push(d);
        assert!(body.check().is_err(), "from format 2 on, configurations are named by sha256");
        body.format = 1;
        assert!(body.check().is_ok());
    }

    #[test]
    fn check_refuses_inexact_entries() {
        assert!(sample_body(1).check().is_ok());
        let mut off = sample_body(1);
        off.splits[0].amount += 1;
        assert!(off.check().unwrap_err().contains("sum"));
        let mut failed = sample_body(1);
        failed.outcome = Outcome::Failed;
        assert!(failed.check().is_err());
        failed.charge.amount = 0;
        failed.splits.clear();
        assert!(failed.check().is_ok());
    }

    #[test]
    fn link_depends_on_every_part() {
        let h = link(GENESIS_HASH, 1, 5, "{}");
        assert_eq!(h.len(), 64);
        assert_ne!(h, link(GENESIS_HASH, 2, 5, "{}"));
        assert_ne!(h, link(GENESIS_HASH, 1, 6, "{}"));
        assert_ne!(h, link(GENESIS_HASH, 1, 5, "{ }"));
        assert_ne!(h, link(&"1".repeat(64), 1, 5, "{}"));
    }
}
