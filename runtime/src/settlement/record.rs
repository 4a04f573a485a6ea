//! The end of a request's settlement: price and attribute what it used, write its ledger entry,
//! and build the `billing` object its client receives.

use std::sync::Arc;

use openlora_sdk::Money;
use serde_json::{Value, json};

use super::context::{Context, SettleError, blocking};
use crate::engine::{Ended, FinishReason, Usage};
use crate::error::LedgerError;
use crate::ledger::entry::ENTRY_FORMAT;
use crate::ledger::{Appended, Artifact, EntryBody, Ledger, NewEntry, Outcome, StoredEntry, now_ms};
use crate::policy::PolicyHost;
use crate::policy::wasm::config_sha256;

/// The `billing` object of a response: the usage the policies saw, the entry's charge, splits,
/// deciders and place in the ledger. A decider's configuration is the operator's or the owner's business (the built-in
/// router's lists every tenant's allow-list): the tenant sees only its sha256.
pub fn billing_json(body: &EntryBody, stored: &StoredEntry) -> Value {
    let deciders: Vec<Value> = body
        .deciders
        .iter()
        .map(|d| {
            json!({
                "slot": d.slot, "plugin": d.plugin, "version": d.version, "failure": d.failure, "fuel": d.fuel,
                "config_sha256": d.config_sha256.clone().or_else(|| d.config.as_deref().and_then(config_sha256)),
            })
        })
        .collect();
    json!({
        "request_id": body.request_id,
        "usage": body.usage,
        "charge": body.charge,
        "splits": body.splits,
        "decided_by": deciders,
        "ledger": {"seq": stored.seq, "hash": stored.hash, "outcome": body.outcome},
    })
}

/// Records how requests ended: owns the policy host, the ledger and the base model's identity.
pub(crate) struct Recorder {
    pub policy: Arc<PolicyHost>,
    pub ledger: Arc<Ledger>,
    pub base: Artifact,
    pub currency: String,
}

impl Recorder {
    /// Prices and attributes a request that did work and writes its ledger entry durably;
    /// returns the `billing` object (`None` when no work was done: nothing is recorded). A
    /// policy failure still records the request (with a zero charge) before the error is
    /// returned.
    pub(crate) async fn record(
        self: &Arc<Self>,
        ctx: &Context,
        ended: Ended,
        usage: &Usage,
    ) -> Result<Option<Value>, SettleError> {
        let (outcome, finish) = match &ended {
            Ended::Finished(FinishReason::Cancelled) => (Outcome::Cancelled, "cancelled".to_string()),
            Ended::Finished(r) => (Outcome::Completed, r.as_str().to_string()),
            Ended::Failed(m) => (Outcome::Failed, m.clone()),
        };
        let did_work = match outcome {
            Outcome::Cancelled => usage.completion_tokens > 0,
            Outcome::Failed => usage.steps > 0 || usage.compute_ms > 0,
            Outcome::Completed => true,
        };
        if !did_work {
            return Ok(None);
        }
        let (svc, ctx, usage) = (self.clone(), ctx.clone(), usage.for_policy());
        let (billing, policy_error) = blocking("settlement", move || {
            let mut deciders = vec![ctx.routed_by.clone()];
            let zero = || Money::new(0, svc.currency.clone());
            let (charge, splits, owner_share, outcome, finish, policy_error) = if outcome == Outcome::Failed {
                (zero(), Vec::new(), None, outcome, finish, None)
            } else {
                match svc.policy.settle(&ctx.info, &usage) {
                    Ok(s) => {
                        deciders.extend(s.deciders);
                        (s.charge, s.splits, s.owner_share, outcome, finish, None)
                    }
                    Err(e) => (zero(), Vec::new(), None, Outcome::Failed, format!("policy: {e}"), Some(e)),
                }
            };
            let body = EntryBody {
                format: ENTRY_FORMAT,
                request_id: ctx.info.request_id.clone(),
                request_key: ctx.key.clone(),
                tenant: ctx.info.tenant.clone(),
                outcome,
                finish,
                base_model: svc.base.clone(),
                adapter: ctx.adapter.clone(),
                request: ctx.info.clone(),
                usage,
                charge,
                splits,
                deciders,
                finished_at_ms: now_ms(),
                owner_share,
            };
            let plugins = body.plugin_hashes().into_iter().filter(|sha| svc.ledger.needs_blob(sha));
            let kept = |sha: &str| ctx.router_blob.as_ref().filter(|(s, _)| s == sha).map(|(_, b)| b.clone());
            let mut blobs: Vec<_> =
                plugins.filter_map(|sha| kept(&sha).or_else(|| svc.policy.blob(&sha)).map(|b| (sha, b))).collect();
            let configs = body.config_hashes().into_iter().filter(|sha| svc.ledger.needs_blob(sha));
            blobs.extend(configs.filter_map(|sha| svc.policy.config_text(&sha).map(|c| (sha, c.into_bytes()))));
            let entry = NewEntry::new(body, blobs).map_err(LedgerError::Refused).map_err(crate::Error::from)?;
            let body = entry.body.clone();
            let billing = match svc.ledger.append(entry)? {
                Appended::Written(stored) => billing_json(&body, &stored),
                // Already recorded (a retry of the same key): the first entry stands, charged once.
                Appended::Duplicate(stored) => {
                    let first = stored.parse().map_err(LedgerError::Refused).map_err(crate::Error::from)?;
                    billing_json(&first, &stored)
                }
            };
            Ok((billing, policy_error))
        })
        .await?;
        match policy_error {
            Some(e) => Err(e.into()),
            None => Ok(Some(billing)),
        }
    }
}
