//! Signed checkpoints of the ledger's head. The hash chain shows that no entry was changed
//! *unless the whole chain after it was recomputed*, which anyone who can write the database
//! can do. A checkpoint is the chain's head (sequence number and hash) signed with an Ed25519
//! key kept outside the database (a 0600 file under the data directory): a rewrite of any entry
//! at or before a checkpoint, or a cut of the tail behind it, contradicts the signature, and
//! only the key's holder can sign a new one.
//!
//! The server signs its head every `checkpoint_every` entries and at shutdown; each checkpoint
//! is stored in the ledger and the latest one also in a file beside the key, where a database
//! writer cannot remove it. `openlora ledger checkpoint` prints the latest, for publishing
//! elsewhere.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::entry::Head;
use super::entry::hex;
use crate::error::{Error, LedgerError, Result};

/// What a ledger checkpoint's signature covers, before the head's sequence number and hash.
const DOMAIN: &str = "openlora-ledger-checkpoint-v1";

/// The same for a checkpoint of the audit trail's head (so neither passes for the other).
pub const AUDIT_DOMAIN: &str = "openlora-audit-checkpoint-v1";

/// The head of the chain at one moment, signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The head's sequence number (entries `1..=seq` are covered).
    pub seq: u64,
    /// The hash of entry `seq`.
    pub hash: String,
    /// When it was signed (ms since the epoch).
    pub signed_at_ms: u64,
    /// The signer's public key (hex); verification uses the key it is given, not this one.
    pub public_key: String,
    /// The Ed25519 signature (hex) of the domain, `seq`, `hash` and `signed_at_ms`.
    pub signature: String,
}

fn message(domain: &str, seq: u64, hash: &str, signed_at_ms: u64) -> Vec<u8> {
    format!("{domain}\n{seq}\n{hash}\n{signed_at_ms}").into_bytes()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.trim();
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl Checkpoint {
    /// Signs the ledger's `head` with `key` at `signed_at_ms`.
    pub fn sign(key: &SigningKey, head: &Head, signed_at_ms: u64) -> Self {
        Self::sign_in(DOMAIN, key, head, signed_at_ms)
    }

    /// Whether `key` signed this ledger checkpoint as it stands.
    pub fn verify(&self, key: &VerifyingKey) -> std::result::Result<(), String> {
        self.verify_in(DOMAIN, key)
    }

    /// Signs the head of the chain `domain` names.
    pub fn sign_in(domain: &str, key: &SigningKey, head: &Head, signed_at_ms: u64) -> Self {
        let signature = key.sign(&message(domain, head.seq, &head.hash, signed_at_ms));
        Checkpoint {
            seq: head.seq,
            hash: head.hash.clone(),
            signed_at_ms,
            public_key: hex(key.verifying_key().as_bytes()),
            signature: hex(&signature.to_bytes()),
        }
    }

    /// Whether `key` signed this checkpoint of the chain `domain` names, as it stands.
    pub fn verify_in(&self, domain: &str, key: &VerifyingKey) -> std::result::Result<(), String> {
        let sig = unhex::<64>(&self.signature).ok_or("its signature is not 64 bytes of hex")?;
        key.verify(&message(domain, self.seq, &self.hash, self.signed_at_ms), &Signature::from_bytes(&sig))
            .map_err(|_| "its signature is not the trusted key's".to_string())
    }
}

/// Parses a public key given as 64 hex digits.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey> {
    let bytes = unhex::<32>(text).ok_or_else(|| LedgerError::Invalid("a public key is 64 hex digits".into()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| LedgerError::Invalid("not an Ed25519 public key".into()).into())
}

/// The public key of `key`, as 64 hex digits.
pub fn public_key_hex(key: &VerifyingKey) -> String {
    hex(key.as_bytes())
}

/// Reads the signing key at `path` (64 hex digits: the secret seed), refusing a file others may
/// read.
pub fn read_key(path: &Path) -> Result<SigningKey> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(Error::config(
                path,
                "-",
                format!("the ledger's signing key is readable by others (mode {:o}): chmod 600 it", mode & 0o777),
            ));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let seed = unhex::<32>(&text).ok_or_else(|| Error::config(path, "-", "a signing key is 64 hex digits"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads the signing key at `path`, creating one (mode 0600) if there is none.
pub fn read_or_create_key(path: &Path) -> Result<SigningKey> {
    if path.exists() {
        return read_key(path);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path).map_err(|e| Error::io(path, e))?;
    f.write_all(hex(key.as_bytes()).as_bytes()).and_then(|_| f.sync_all()).map_err(|e| Error::io(path, e))?;
    tracing::info!(path = %path.display(), public_key = %public_key_hex(&key.verifying_key()), "created the ledger's signing key");
    Ok(key)
}

/// A file beside the key: its name with `suffix`.
fn beside(key_path: &Path, suffix: &str) -> PathBuf {
    let mut name = key_path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    key_path.with_file_name(name)
}

/// Where the latest checkpoint is kept beside the key (outside the database).
pub fn latest_path(key_path: &Path) -> PathBuf {
    beside(key_path, ".checkpoint.json")
}

/// Where the latest checkpoint of the audit trail is kept beside the key.
pub fn audit_latest_path(key_path: &Path) -> PathBuf {
    beside(key_path, ".audit-checkpoint.json")
}

/// Writes `c` as the latest checkpoint at `path` (atomically).
pub fn write_latest(path: &Path, c: &Checkpoint) -> Result<()> {
    // A name of this process's own: replicas sharing the key may write at the same moment.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let text = serde_json::to_string_pretty(c).map_err(|e| LedgerError::Invalid(e.to_string()))?;
    std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| Error::io(path, e))
}

/// The latest checkpoint kept at `path`, if any.
pub fn read_latest(path: &Path) -> Result<Option<Checkpoint>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::config(path, "-", format!("not a checkpoint: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// What verification trusts to judge checkpoints by.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// The signer's public key (none: checkpoints cannot be judged, and the report says so).
    pub key: Option<VerifyingKey>,
    /// A checkpoint known from outside the database (the file beside the key, or a published one).
    pub outside: Vec<Checkpoint>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_with_its_key_only_and_breaks_when_changed() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let c = Checkpoint::sign(&key, &Head { seq: 42, hash: "ab".repeat(32) }, 1_000);
        assert!(c.verify(&key.verifying_key()).is_ok());
        let other = SigningKey::from_bytes(&[8; 32]);
        assert!(c.verify(&other.verifying_key()).is_err());
        for changed in [
            Checkpoint { seq: 41, ..c.clone() },
            Checkpoint { hash: "cd".repeat(32), ..c.clone() },
            Checkpoint { signed_at_ms: 1_001, ..c.clone() },
        ] {
            assert!(changed.verify(&key.verifying_key()).is_err(), "{changed:?}");
        }
        assert_eq!(parse_public_key(&c.public_key).unwrap(), key.verifying_key());
    }

    #[test]
    fn the_key_file_is_created_private_and_refused_when_others_can_read_it() {
        let dir = std::env::temp_dir().join(format!("openlora-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("ledger-signing.key");
        let key = read_or_create_key(&path).unwrap();
        assert_eq!(read_or_create_key(&path).unwrap().to_bytes(), key.to_bytes(), "read back, not replaced");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(read_key(&path).unwrap_err().to_string().contains("chmod 600"));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
