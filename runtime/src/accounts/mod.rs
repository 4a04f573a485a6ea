//! Who may do what: the owners of adapters, the keys of owners, tenants and contributors (kept
//! in the ledger's database, hashed), owners' quotas, and the audit trail of every
//! administrative act. The HTTP layer resolves each request's [`Caller`] here and asks it
//! before acting.

pub mod audit;
pub mod keys;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use audit::{Act, AuditRecord, AuditReport};
pub use keys::{KeyRecord, Scope};

use crate::error::{AccountError, Result};
use crate::ledger::checkpoint::{AUDIT_DOMAIN, read_latest, write_latest};
use crate::ledger::{Location, now_ms};
use crate::sql::{Db, Val};

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin token.
    Operator,
    /// The command line, on the database itself.
    Cli,
    /// A tenant (TOML key, database key, or anyone on a server without keys).
    Tenant {
        /// The tenant.
        name: String,
        /// Its database key's id, if it used one.
        key_id: Option<String>,
    },
    /// An adapter owner.
    Owner {
        /// The owner.
        name: String,
        /// Its key's id.
        key_id: String,
    },
    /// One payee of one owner, read only.
    Contributor {
        /// The owner that minted the key.
        owner: String,
        /// The payee it reads.
        payee: String,
        /// Its key's id.
        key_id: String,
    },
}

impl Caller {
    /// The caller a live database key stands for.
    pub fn from_key(k: &KeyRecord) -> Self {
        let key_id = k.id.clone();
        match k.scope {
            Scope::Owner => Caller::Owner { name: k.account.clone(), key_id },
            Scope::Tenant => Caller::Tenant { name: k.account.clone(), key_id: Some(key_id) },
            Scope::Contributor => {
                Caller::Contributor { owner: k.account.clone(), payee: k.payee.clone().unwrap_or_default(), key_id }
            }
        }
    }

    /// How the audit trail names it.
    pub fn actor(&self) -> String {
        match self {
            Caller::Operator => "operator".into(),
            Caller::Cli => "cli".into(),
            Caller::Tenant { name, .. } => format!("tenant:{name}"),
            Caller::Owner { name, .. } => format!("owner:{name}"),
            Caller::Contributor { owner, payee, .. } => format!("contributor:{owner}:{payee}"),
        }
    }

    /// The id of the key it came with.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Caller::Operator | Caller::Cli => None,
            Caller::Tenant { key_id, .. } => key_id.as_deref(),
            Caller::Owner { key_id, .. } | Caller::Contributor { key_id, .. } => Some(key_id),
        }
    }

    /// Whether it holds every right (the admin token or the CLI).
    pub fn is_operator(&self) -> bool {
        matches!(self, Caller::Operator | Caller::Cli)
    }
}

/// An owner's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quotas {
    /// Adapters it may have.
    pub max_adapters: u64,
    /// Bytes all its adapters' files may take.
    pub max_adapter_bytes: u64,
    /// Plugin installs per rolling hour.
    pub max_installs_per_hour: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas { max_adapters: 16, max_adapter_bytes: 1 << 30, max_installs_per_hour: 20 }
    }
}

/// Quotas to set for one owner (absent: the server's default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaOverrides {
    /// Adapters it may have.
    pub max_adapters: Option<u64>,
    /// Bytes all its adapters' files may take.
    pub max_adapter_bytes: Option<u64>,
    /// Plugin installs per rolling hour.
    pub max_installs_per_hour: Option<u64>,
}

/// One owner account.
#[derive(Debug, Clone, Serialize)]
pub struct OwnerRecord {
    /// Its name (what its adapters record as their owner).
    pub name: String,
    /// When it was made.
    pub created_at_ms: u64,
    /// Its own quotas, where set.
    pub overrides: QuotaOverrides,
    /// The quotas that apply.
    pub quotas: Quotas,
}

/// A key to make.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// `owner`, `tenant` or `contributor`.
    pub scope: String,
    /// The owner or tenant (a contributor key: the owner; an owner's own request may omit it).
    #[serde(default)]
    pub account: Option<String>,
    /// The payee a contributor key reads.
    #[serde(default)]
    pub payee: Option<String>,
    /// A note.
    #[serde(default)]
    pub label: Option<String>,
    /// Seconds until it stops working.
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

/// Whether `name` is an acceptable tenant name (1-64 of `A-Z a-z 0-9 . _ -`: no `:` or `/`, so
/// that keys built from a tenant and a client's string, like idempotency keys, cannot collide)
/// or, for an owner, owner name (the same and `@`, as an adapter records it).
pub fn valid_account(name: &str, owner: bool) -> bool {
    if owner {
        return crate::adapters::valid_owner(name);
    }
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn invalid(param: &'static str, message: impl Into<String>) -> crate::Error {
    AccountError::Invalid { param, message: message.into() }.into()
}

/// Longest a key may live: ten years.
const MAX_KEY_SECS: u64 = 10 * 365 * 86_400;

/// Signs the audit trail's head after each act, with the ledger's key, into a file beside it.
#[derive(Clone)]
pub struct AuditSigner {
    /// The ledger's signing key.
    pub key: ed25519_dalek::SigningKey,
    /// Where the latest checkpoint goes ([`crate::ledger::checkpoint::audit_latest_path`]).
    pub path: std::path::PathBuf,
}

/// What checking the audit trail trusts: the signer's public key and the latest checkpoint kept
/// beside it.
#[derive(Debug, Clone, Default)]
pub struct AuditTrust {
    /// The signer's public key (none: the checkpoint cannot be judged).
    pub key: Option<ed25519_dalek::VerifyingKey>,
    /// The latest checkpoint of the trail's head, from outside the database.
    pub latest: Option<crate::ledger::Checkpoint>,
}

/// Accounts, keys and the audit trail, on one connection to the ledger's database (and the
/// third parties' reports on another, so that a long report never delays a key lookup).
pub struct Accounts {
    location: Location,
    db: Mutex<Option<Db>>,
    reports: Mutex<Option<Db>>,
    defaults: Quotas,
    signer: Option<AuditSigner>,
    signing: Mutex<()>,
}

impl Accounts {
    /// Connects and creates the tables if needed; `signer` signs the trail's head after each act.
    pub fn open(location: &Location, defaults: Quotas, signer: Option<AuditSigner>) -> Result<Arc<Self>> {
        let mut db = location.connect()?;
        let bigint = "BIGINT";
        let schema = format!(
            "CREATE TABLE IF NOT EXISTS owners (
                name TEXT PRIMARY KEY,
                created_at_ms {bigint} NOT NULL,
                max_adapters {bigint},
                max_adapter_bytes {bigint},
                max_installs_per_hour {bigint}
            );
            CREATE TABLE IF NOT EXISTS api_keys (
                id TEXT PRIMARY KEY,
                key_sha256 TEXT NOT NULL,
                scope TEXT NOT NULL,
                account TEXT NOT NULL,
                payee TEXT,
                label TEXT,
                created_at_ms {bigint} NOT NULL,
                expires_at_ms {bigint},
                revoked_at_ms {bigint},
                created_by TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS api_keys_account ON api_keys (account);
            {}",
            audit::schema(bigint)
        );
        db.atomically(|db| {
            if db.is_postgres() {
                // Replicas starting together create the tables one at a time.
                db.rows("SELECT pg_advisory_xact_lock(7271728)::TEXT", &[])?;
            }
            db.batch(&schema)?;
            db.exec(
                "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, $1) ON CONFLICT DO NOTHING",
                &[crate::ledger::entry::GENESIS_HASH.into()],
            )?;
            Ok(())
        })?;
        Ok(Arc::new(Accounts {
            location: location.clone(),
            db: Mutex::new(Some(db)),
            reports: Mutex::new(None),
            defaults,
            signer,
            signing: Mutex::new(()),
        }))
    }

    /// Runs queries on the accounts' connection (reconnecting after a failure).
    pub fn with<T>(&self, work: impl FnOnce(&mut Db) -> Result<T>) -> Result<T> {
        self.on(&self.db, work)
    }

    /// Runs a report's queries (earnings, `explain`, a dry-run's entries) on their own connection.
    pub fn report<T>(&self, work: impl FnOnce(&mut Db) -> Result<T>) -> Result<T> {
        self.on(&self.reports, work)
    }

    fn on<T>(&self, connection: &Mutex<Option<Db>>, work: impl FnOnce(&mut Db) -> Result<T>) -> Result<T> {
        let mut guard = connection.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.location.connect()?);
        }
        let db = guard.as_mut().ok_or_else(|| AccountError::NotFound("no connection".into()))?;
        let result = work(db);
        if matches!(result, Err(crate::Error::Account(AccountError::Store { .. }))) {
            *guard = None;
        }
        result
    }

    /// The live key `key` is, if any (unknown, revoked and expired keys are `None`).
    pub fn authenticate(&self, key: &str) -> Result<Option<KeyRecord>> {
        if keys::key_id(key).is_none() {
            return Ok(None);
        }
        let now = now_ms();
        Ok(self.with(|db| keys::find(db, key))?.filter(|k| k.live(now)))
    }

    /// Appends an act by `by` to the audit trail.
    pub fn record(&self, by: &Caller, action: &str, target: &str, sha256: Option<&str>, detail: &str) -> Result<()> {
        let act = Act {
            actor: by.actor(),
            key_id: by.key_id().map(str::to_string),
            action: action.to_string(),
            target: target.to_string(),
            sha256: sha256.map(str::to_string),
            detail: detail.to_string(),
        };
        let rec = self.with(|db| audit::append(db, &act, now_ms()))?;
        if let Some(s) = &self.signer {
            let head = crate::ledger::Head { seq: rec.seq, hash: rec.hash.clone() };
            let c = crate::ledger::Checkpoint::sign_in(AUDIT_DOMAIN, &s.key, &head, now_ms());
            // Several acts at once: the file keeps the latest head written.
            let _one = self.signing.lock().unwrap_or_else(|p| p.into_inner());
            let newer = read_latest(&s.path).ok().flatten().is_none_or(|old| old.seq < c.seq);
            if newer {
                write_latest(&s.path, &c)?;
            }
        }
        Ok(())
    }

    /// Makes a key; returns its record and the key itself (shown once, never stored).
    pub fn create_key(&self, by: &Caller, new: NewKey) -> Result<(KeyRecord, String)> {
        let scope =
            Scope::parse(&new.scope).ok_or_else(|| invalid("scope", "scope is owner, tenant or contributor"))?;
        let account = match (by, scope) {
            (Caller::Owner { name, .. }, Scope::Contributor) => match new.account {
                Some(a) if &a != name => {
                    return Err(AccountError::Forbidden("an owner mints keys for itself".into()).into());
                }
                _ => name.clone(),
            },
            (Caller::Owner { .. }, _) => {
                return Err(AccountError::Forbidden("an owner may only mint contributor keys".into()).into());
            }
            (b, _) if b.is_operator() => new.account.ok_or_else(|| invalid("account", "account is required"))?,
            _ => return Err(AccountError::Forbidden("this key cannot make keys".into()).into()),
        };
        if !valid_account(&account, scope != Scope::Tenant) {
            return Err(invalid("account", "accounts are 1-64 characters of A-Z a-z 0-9 - _ . (owners also @)"));
        }
        let payee = match (scope, new.payee) {
            (Scope::Contributor, Some(p)) => {
                // A payee a plugin can pay, by the rules the host checks splits by.
                openlora_sdk::money::validate_payee(&p).map_err(|m| invalid("payee", m))?;
                Some(p)
            }
            (Scope::Contributor, None) => return Err(invalid("payee", "a contributor key needs its payee")),
            (_, Some(_)) => return Err(invalid("payee", "only contributor keys have a payee")),
            (_, None) => None,
        };
        if let Some(label) = &new.label
            && (label.len() > 200 || label.chars().any(char::is_control))
        {
            return Err(invalid("label", "labels are at most 200 characters, without control characters"));
        }
        let now = now_ms();
        let expires_at_ms = match new.expires_in_secs {
            Some(0) => return Err(invalid("expires_in_secs", "expires_in_secs must be at least 1")),
            Some(s) if s > MAX_KEY_SECS => return Err(invalid("expires_in_secs", "keys live at most ten years")),
            Some(s) => Some(now + s * 1000),
            None => None,
        };
        let (id, key) = keys::generate();
        let rec = KeyRecord {
            id,
            scope,
            account,
            payee,
            label: new.label,
            created_at_ms: now,
            expires_at_ms,
            revoked_at_ms: None,
            created_by: by.actor(),
        };
        self.with(|db| {
            db.atomically(|db| {
                match scope {
                    Scope::Owner => insert_owner(db, &rec.account, now)?,
                    Scope::Contributor if owner_row(db, &rec.account)?.is_none() => {
                        return Err(AccountError::NotFound(format!("no owner `{}`", rec.account)).into());
                    }
                    _ => {}
                }
                keys::insert(db, &rec, &key)
            })
        })?;
        let detail = format!(
            "scope={} account={}{}",
            scope.as_str(),
            rec.account,
            rec.payee.as_deref().map(|p| format!(" payee={p}")).unwrap_or_default()
        );
        self.record(by, "key.create", &rec.id, None, &detail)?;
        Ok((rec, key))
    }

    /// Whether `by` may see (and revoke) key `k`: the operator any, an owner the contributor
    /// keys it minted (not its own owner keys, nor a tenant's of the same name).
    fn sees(by: &Caller, k: &KeyRecord) -> bool {
        match by {
            b if b.is_operator() => true,
            Caller::Owner { name, .. } => k.scope == Scope::Contributor && &k.account == name,
            _ => false,
        }
    }

    /// The keys `by` may see: all for the operator, its contributors' for an owner.
    pub fn list_keys(&self, by: &Caller) -> Result<Vec<KeyRecord>> {
        let account = match by {
            b if b.is_operator() => None,
            Caller::Owner { name, .. } => Some(name.as_str()),
            _ => return Err(AccountError::Forbidden("this key cannot list keys".into()).into()),
        };
        let all = self.with(|db| keys::list(db, account))?;
        Ok(all.into_iter().filter(|k| Self::sees(by, k)).collect())
    }

    /// Revokes a key `by` may see (others are not found).
    pub fn revoke_key(&self, by: &Caller, id: &str) -> Result<KeyRecord> {
        if !matches!(by, Caller::Owner { .. }) && !by.is_operator() {
            return Err(AccountError::Forbidden("this key cannot revoke keys".into()).into());
        }
        let visible = self.with(|db| keys::by_id(db, id))?.filter(|k| Self::sees(by, k));
        let mut rec = visible.ok_or_else(|| AccountError::NotFound(format!("no key `{id}`")))?;
        let now = now_ms();
        self.with(|db| keys::revoke(db, id, now))?;
        rec.revoked_at_ms = rec.revoked_at_ms.or(Some(now));
        self.record(by, "key.revoke", id, None, &format!("scope={} account={}", rec.scope.as_str(), rec.account))?;
        Ok(rec)
    }

    /// Sets an owner's quotas (creating the owner if it is new).
    pub fn set_quotas(&self, by: &Caller, name: &str, q: QuotaOverrides) -> Result<OwnerRecord> {
        if !by.is_operator() {
            return Err(AccountError::Forbidden("only the operator sets quotas".into()).into());
        }
        if !valid_account(name, true) {
            return Err(invalid("name", "owners are 1-64 characters of A-Z a-z 0-9 - _ . @"));
        }
        let opt = |v: Option<u64>| Val::from(v);
        self.with(|db| {
            db.atomically(|db| {
                insert_owner(db, name, now_ms())?;
                db.exec(
                    "UPDATE owners SET max_adapters = $1, max_adapter_bytes = $2, max_installs_per_hour = $3 WHERE name = $4",
                    &[opt(q.max_adapters), opt(q.max_adapter_bytes), opt(q.max_installs_per_hour), name.into()],
                )
            })
        })?;
        self.record(by, "owner.quotas", name, None, &serde_json::to_string(&q).unwrap_or_default())?;
        self.owner(name)?.ok_or_else(|| AccountError::NotFound(format!("no owner `{name}`")).into())
    }

    /// One owner.
    pub fn owner(&self, name: &str) -> Result<Option<OwnerRecord>> {
        let row = self.with(|db| owner_row(db, name))?;
        Ok(row.map(|r| self.owner_record(&r)))
    }

    /// Every owner, by name.
    pub fn owners(&self) -> Result<Vec<OwnerRecord>> {
        let rows = self.with(|db| db.rows(&format!("SELECT {OWNER_COLUMNS} FROM owners ORDER BY name"), &[]))?;
        Ok(rows.iter().map(|r| self.owner_record(r)).collect())
    }

    /// The quotas that apply to `owner` (the defaults for an owner without a record).
    pub fn quotas(&self, owner: &str) -> Result<Quotas> {
        Ok(self.owner(owner)?.map_or(self.defaults, |o| o.quotas))
    }

    /// Refuses an owner's plugin install beyond its hourly quota (429 with the wait).
    pub fn check_install_quota(&self, by: &Caller) -> Result<()> {
        let Caller::Owner { name, .. } = by else { return Ok(()) };
        let limit = self.quotas(name)?.max_installs_per_hour;
        let now = now_ms();
        let (n, oldest) =
            self.with(|db| audit::count_since(db, &by.actor(), "plugin.install", now.saturating_sub(3_600_000)))?;
        if n >= limit {
            let wait = oldest.map_or(3600, |t| (t + 3_600_000).saturating_sub(now).div_ceil(1000).max(1));
            return Err(AccountError::Quota {
                message: format!("owner `{name}` may install {limit} plugins per hour; try again in {wait} s"),
                size: false,
                retry_after: Some(wait),
            }
            .into());
        }
        Ok(())
    }

    /// The audit records `by` may read: all for the operator, its own acts for an owner.
    pub fn audit(&self, by: &Caller, since_ms: u64, after: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        let actor = match by {
            b if b.is_operator() => None,
            Caller::Owner { .. } => Some(by.actor()),
            _ => return Err(AccountError::Forbidden("this key cannot read the audit trail".into()).into()),
        };
        self.with(|db| audit::list(db, actor.as_deref(), since_ms, after, limit.clamp(1, 1000)))
    }

    /// Checks the whole audit trail, and holds it to the latest signed checkpoint `trust` has.
    pub fn verify_audit(&self, trust: &AuditTrust) -> Result<AuditReport> {
        let signed = match (&trust.latest, &trust.key) {
            (Some(c), Some(key)) => match c.verify_in(AUDIT_DOMAIN, key) {
                Ok(()) => Some(c),
                Err(why) => {
                    let mut r = self.with(|db| audit::verify(db, None))?;
                    r.problem = Some(format!("the audit checkpoint beside the key is forged: {why}"));
                    return Ok(r);
                }
            },
            _ => None,
        };
        let mut report = self.with(|db| audit::verify(db, signed))?;
        if trust.key.is_none() {
            report.checkpoint_unchecked = Some("no public key to trust (the signing key cannot be read)".into());
        } else if trust.latest.is_none() {
            report.checkpoint_unchecked = Some("no signed checkpoint of the audit trail yet".into());
        }
        Ok(report)
    }

    fn owner_record(&self, r: &[Val]) -> OwnerRecord {
        let get = |i: usize| r[i].int().map(|v| v.max(0) as u64);
        let overrides =
            QuotaOverrides { max_adapters: get(2), max_adapter_bytes: get(3), max_installs_per_hour: get(4) };
        let d = self.defaults;
        OwnerRecord {
            name: r[0].string(),
            created_at_ms: get(1).unwrap_or(0),
            overrides,
            quotas: Quotas {
                max_adapters: overrides.max_adapters.unwrap_or(d.max_adapters),
                max_adapter_bytes: overrides.max_adapter_bytes.unwrap_or(d.max_adapter_bytes),
                max_installs_per_hour: overrides.max_installs_per_hour.unwrap_or(d.max_installs_per_hour),
            },
        }
    }
}

const OWNER_COLUMNS: &str = "name, created_at_ms, max_adapters, max_adapter_bytes, max_installs_per_hour";

fn owner_row(db: &mut Db, name: &str) -> Result<Option<Vec<Val>>> {
    Ok(db.rows(&format!("SELECT {OWNER_COLUMNS} FROM owners WHERE name = $1"), &[name.into()])?.into_iter().next())
}

fn insert_owner(db: &mut Db, name: &str, now: u64) -> Result<()> {
    db.exec(
        "INSERT INTO owners (name, created_at_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[name.into(), now.into()],
    )
    .map(drop)
}

#[cfg(test)]
mod tests;
