//! API keys from the database: how they are made (`olk_<id>_<secret>`), stored (id and sha256
//! only, never the key), found, listed and revoked.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{AccountError, Result};
use crate::ledger::entry::hex;
use crate::sql::{Db, Val};

/// What a key lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// An adapter owner: its adapters, their slots, its earnings, its contributors' keys.
    Owner,
    /// A tenant: inference and its own usage.
    Tenant,
    /// One payee of one owner: that payee's earnings, read only.
    Contributor,
}

impl Scope {
    /// Its name in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Owner => "owner",
            Scope::Tenant => "tenant",
            Scope::Contributor => "contributor",
        }
    }

    /// Parses a scope's name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "owner" => Some(Scope::Owner),
            "tenant" => Some(Scope::Tenant),
            "contributor" => Some(Scope::Contributor),
            _ => None,
        }
    }
}

/// One stored key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRecord {
    /// Its public id (the `<id>` of `olk_<id>_<secret>`).
    pub id: String,
    /// What it may do.
    pub scope: Scope,
    /// The owner or tenant it acts as (a contributor key: the owner that minted it).
    pub account: String,
    /// The payee a contributor key reads.
    pub payee: Option<String>,
    /// A note from whoever made it.
    pub label: Option<String>,
    /// When it was made (ms since the epoch).
    pub created_at_ms: u64,
    /// When it stops working, if ever.
    pub expires_at_ms: Option<u64>,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<u64>,
    /// Who made it (`operator`, `cli`, `owner:<name>`).
    pub created_by: String,
}

impl KeyRecord {
    /// Whether it is accepted at `now_ms`.
    pub fn live(&self, now_ms: u64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|t| now_ms < t)
    }
}

/// The prefix of every database key.
pub const PREFIX: &str = "olk_";

/// A new key: its id and the whole key (shown once).
pub fn generate() -> (String, String) {
    // `rand`'s thread generator is a CSPRNG seeded from the operating system.
    let id: [u8; 8] = rand::random();
    let secret: [u8; 32] = rand::random();
    let id = hex(&id);
    let key = format!("{PREFIX}{id}_{}", hex(&secret));
    (id, key)
}

/// The sha256 (hex) a key is stored as.
pub fn key_hash(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// The id of a well-formed database key.
pub fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hexy = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexy(id, 16) && hexy(secret, 64)).then_some(id)
}

/// Compares two equal-length hex digests without stopping early.
fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const COLUMNS: &str = "id, scope, account, payee, label, created_at_ms, expires_at_ms, revoked_at_ms, created_by";

fn record(row: &[Val]) -> Result<KeyRecord> {
    let scope = row[1].text().and_then(Scope::parse).ok_or_else(|| AccountError::NotFound("bad key scope".into()))?;
    let ms = |v: &Val| v.int().map(|i| i.max(0) as u64);
    Ok(KeyRecord {
        id: row[0].string(),
        scope,
        account: row[2].string(),
        payee: row[3].text().map(str::to_string),
        label: row[4].text().map(str::to_string),
        created_at_ms: ms(&row[5]).unwrap_or(0),
        expires_at_ms: ms(&row[6]),
        revoked_at_ms: ms(&row[7]),
        created_by: row[8].string(),
    })
}

/// Stores a new key (its hash) and returns its record.
pub fn insert(db: &mut Db, rec: &KeyRecord, key: &str) -> Result<()> {
    db.exec(
        &format!("INSERT INTO api_keys ({COLUMNS}, key_sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"),
        &[
            rec.id.clone().into(),
            rec.scope.as_str().into(),
            rec.account.clone().into(),
            rec.payee.clone().into(),
            rec.label.clone().into(),
            rec.created_at_ms.into(),
            rec.expires_at_ms.into(),
            Val::Null,
            rec.created_by.clone().into(),
            key_hash(key).into(),
        ],
    )?;
    Ok(())
}

/// The record of a key as given, if its id exists and its hash matches (live or not).
pub fn find(db: &mut Db, key: &str) -> Result<Option<KeyRecord>> {
    let Some(id) = key_id(key) else { return Ok(None) };
    let rows = db.rows(&format!("SELECT {COLUMNS}, key_sha256 FROM api_keys WHERE id = $1"), &[id.into()])?;
    let Some(row) = rows.first() else { return Ok(None) };
    if !same_digest(&row[9].string(), &key_hash(key)) {
        return Ok(None);
    }
    record(row).map(Some)
}

/// The key with this id.
pub fn by_id(db: &mut Db, id: &str) -> Result<Option<KeyRecord>> {
    let rows = db.rows(&format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1"), &[id.into()])?;
    rows.first().map(|r| record(r)).transpose()
}

/// Every key (`account`: only those of this account), oldest first.
pub fn list(db: &mut Db, account: Option<&str>) -> Result<Vec<KeyRecord>> {
    let rows = match account {
        Some(a) => db.rows(
            &format!("SELECT {COLUMNS} FROM api_keys WHERE account = $1 ORDER BY created_at_ms, id"),
            &[a.into()],
        )?,
        None => db.rows(&format!("SELECT {COLUMNS} FROM api_keys ORDER BY created_at_ms, id"), &[])?,
    };
    rows.iter().map(|r| record(r)).collect()
}

/// Marks a key revoked at `now_ms` (a revoked key stays revoked).
pub fn revoke(db: &mut Db, id: &str, now_ms: u64) -> Result<()> {
    db.exec(
        "UPDATE api_keys SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL",
        &[now_ms.into(), id.into()],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_well_formed_and_stored_as_hashes() {
        let (id, key) = generate();
        assert_eq!(key_id(&key), Some(id.as_str()));
        assert_eq!(key.len(), 4 + 16 + 1 + 64);
        assert_ne!(key_hash(&key), key);
        assert!(!key_hash(&key).contains(&key[21..]));
        for bad in ["", "olk_", "olk_zz_yy", &key[..key.len() - 1], &key.replace("olk_", "sk_")] {
            assert_eq!(key_id(bad), None, "{bad}");
        }
    }
}
