//! The ledger's writer thread: group commit, and signed checkpoints of the head.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::Instant;

use ed25519_dalek::SigningKey;

use super::checkpoint::{Checkpoint, latest_path, write_latest};
use super::entry::{Head, NewEntry, now_ms};
use super::store::{Appended, LedgerStore, Location};
use crate::error::{LedgerError, Result};
use crate::metrics::LedgerMetrics;

/// Most entries one commit writes.
const MAX_BATCH: usize = 256;

/// Work for the writer.
pub(super) enum Job {
    /// Append an entry; answer what became of it.
    Append { entry: NewEntry, reply: SyncSender<Result<Appended>> },
    /// Sign a checkpoint of the head now.
    Checkpoint { reply: SyncSender<Result<Option<Checkpoint>>> },
}

/// How the writer signs checkpoints.
pub struct Signer {
    /// The signing key (held outside the database).
    pub key: SigningKey,
    /// The key's file: the latest checkpoint is kept beside it.
    pub key_path: PathBuf,
    /// Sign the head every this many entries (0: only when asked, e.g. at shutdown).
    pub every: u64,
}

impl Signer {
    /// Signs `head`, stores the checkpoint in the ledger and beside the key.
    fn sign(&self, store: &mut dyn LedgerStore, head: &Head) -> Result<Checkpoint> {
        let c = Checkpoint::sign(&self.key, head, now_ms());
        store.put_checkpoint(&c)?;
        write_latest(&latest_path(&self.key_path), &c)?;
        tracing::info!(seq = c.seq, hash = %c.hash, "ledger checkpoint signed");
        Ok(c)
    }
}

/// The writer: takes every entry waiting (up to [`MAX_BATCH`]), commits them in one
/// transaction, answers each, and signs a checkpoint when the head passes the next multiple
/// of `signer.every`; reconnects after a failure.
pub(super) fn write_loop(
    location: Location,
    mut store: Option<Box<dyn LedgerStore>>,
    rx: Receiver<Job>,
    m: LedgerMetrics,
    signer: Option<Signer>,
) {
    let mut signed_up_to: Option<u64> = None;
    while let Ok(first) = rx.recv() {
        let mut entries = Vec::new();
        let mut replies = Vec::new();
        let mut asks = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Append { entry, reply } => {
                    entries.push(entry);
                    replies.push(reply);
                }
                Job::Checkpoint { reply } => asks.push(reply),
            }
            if entries.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if store.is_none() {
            match location.open() {
                Ok(s) => store = Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "ledger unreachable");
                    fail_all(replies, asks, &e);
                    continue;
                }
            }
        }
        let Some(s) = store.as_mut() else { continue };
        // The head this batch wrote: what a periodic checkpoint signs, without another query.
        let mut written: Option<Head> = None;
        if !entries.is_empty() {
            let t0 = Instant::now();
            match s.append(&entries, now_ms()) {
                Ok(out) => {
                    m.commit_seconds.observe(t0.elapsed().as_secs_f64());
                    m.batch_entries.observe(entries.len() as f64);
                    for ((entry, reply), appended) in entries.iter().zip(replies).zip(out) {
                        match &appended {
                            Appended::Written(e) => {
                                m.entries.with_label_values(&[entry.body.outcome.as_str()]).inc();
                                written = Some(Head { seq: e.seq, hash: e.hash.clone() });
                            }
                            Appended::Duplicate(_) => m.duplicates.inc(),
                        }
                        let _ = reply.send(Ok(appended));
                    }
                }
                Err(e) => {
                    tracing::error!(entries = entries.len(), error = %e, "ledger write failed");
                    store = None;
                    fail_all(replies, asks, &e);
                    continue;
                }
            }
        }
        let Some(signer) = &signer else {
            for ask in asks {
                let _ = ask.send(Ok(None));
            }
            continue;
        };
        let Some(s) = store.as_mut() else { continue };
        let head = match (written, asks.is_empty()) {
            // Nothing new and nobody asking: nothing to sign.
            (None, true) => continue,
            (Some(h), true) => h,
            // Asked: the ledger's own head (other replicas may have written since).
            (_, false) => match s.head() {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(error = %e, "reading the ledger's head to sign it failed");
                    store = None;
                    fail_all(Vec::new(), asks, &e);
                    continue;
                }
            },
        };
        let last = *signed_up_to
            .get_or_insert_with(|| s.checkpoints().ok().and_then(|c| c.last().map(|c| c.seq)).unwrap_or(0));
        let due = signer.every > 0 && head.seq >= last.saturating_add(signer.every);
        if !(due || !asks.is_empty()) {
            continue;
        }
        let signed = signer.sign(s.as_mut(), &head);
        match &signed {
            Ok(c) => signed_up_to = Some(c.seq),
            Err(e) => tracing::error!(error = %e, "signing a ledger checkpoint failed"),
        }
        for ask in asks {
            let _ = ask.send(match &signed {
                Ok(c) => Ok(Some(c.clone())),
                Err(e) => Err(LedgerError::Store { what: "checkpoint".into(), source: e.to_string().into() }.into()),
            });
        }
    }
}

/// Answers every waiting append and checkpoint request with the failure `e`.
fn fail_all(
    replies: Vec<SyncSender<Result<Appended>>>,
    asks: Vec<SyncSender<Result<Option<Checkpoint>>>>,
    e: &crate::error::Error,
) {
    for reply in replies {
        let _ = reply.send(Err(LedgerError::Store { what: "write".into(), source: e.to_string().into() }.into()));
    }
    for ask in asks {
        let _ = ask.send(Err(LedgerError::Store { what: "checkpoint".into(), source: e.to_string().into() }.into()));
    }
}
