//! The policy steps of a request's life in the HTTP layer: route before it is submitted, price
//! and attribute after it finished, and the `billing` object clients receive.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use openlora_sdk::{Money, RequestInfo};
use serde_json::{Value, json};

use super::{ApiError, Shared, blocking};
use crate::engine::{GenerationRequest, Usage};
use crate::generate::FinishReason;
use crate::ledger::entry::ENTRY_FORMAT;
use crate::ledger::{Appended, Artifact, EntryBody, KeyGuard, KeyState, NewEntry, Outcome, StoredEntry, now_ms};
use crate::policy::{Decider, Routed};

/// Longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Most metadata entries a request may carry (as OpenAI allows).
const MAX_METADATA: usize = 16;

/// What a request carries through the policy steps to its ledger entry.
#[derive(Clone)]
pub struct PolicyContext {
    /// What the plugins are told about the request (adapter and owner as routed).
    pub info: RequestInfo,
    /// Who routed it.
    pub routed_by: Decider,
    /// The key its ledger entry is unique by.
    pub key: String,
    /// Holds a client's idempotency key until the entry is written (held, never read).
    #[allow(dead_code)]
    pub guard: Option<Arc<KeyGuard>>,
}

/// Checks a request's `metadata` (at most 16 entries, keys ≤ 64 and values ≤ 512 characters).
pub fn metadata(m: Option<BTreeMap<String, String>>) -> Result<Vec<(String, String)>, ApiError> {
    let m = m.unwrap_or_default();
    if m.len() > MAX_METADATA {
        return Err(ApiError::invalid(Some("metadata".into()), format!("at most {MAX_METADATA} entries")));
    }
    for (k, v) in &m {
        if k.chars().count() > 64 || v.chars().count() > 512 {
            return Err(ApiError::invalid(
                Some(format!("metadata.{k}")),
                "metadata keys are at most 64 characters and values at most 512",
            ));
        }
    }
    Ok(m.into_iter().collect())
}

fn owner_of(state: &Shared, adapter: Option<&str>) -> Option<String> {
    state.engine.pager().manifest(adapter?).and_then(|m| m.owner.clone())
}

/// The request as plugins see it before routing, arriving now: `adapter` is the requested name
/// unless it names the base model.
pub fn request_info(
    state: &Shared,
    req: &GenerationRequest,
    tenant: &str,
    model: &str,
    metadata: Vec<(String, String)>,
) -> RequestInfo {
    let adapter = (model != state.model_name).then(|| model.to_string());
    RequestInfo {
        request_id: req.id.clone(),
        tenant: tenant.to_string(),
        requested_model: model.to_string(),
        adapter_owner: owner_of(state, adapter.as_deref()),
        adapter,
        prompt_tokens: u32::try_from(req.prompt_ids.len()).unwrap_or(u32::MAX),
        max_tokens: u32::try_from(req.params.max_tokens).unwrap_or(u32::MAX),
        metadata,
        received_at_ms: now_ms(),
    }
}

/// The request's ledger key: the client's `Idempotency-Key` (scoped to its tenant), held for
/// this request — refused with a 409 if a request with the same key is running or has its
/// entry already — or else the request id.
pub async fn reserve(
    state: &Shared,
    headers: &HeaderMap,
    tenant: &str,
    request_id: &str,
) -> Result<(String, Option<Arc<KeyGuard>>), ApiError> {
    let Some(raw) = headers.get("idempotency-key") else { return Ok((format!("req:{request_id}"), None)) };
    let given = raw.to_str().ok().filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY).ok_or_else(|| {
        ApiError::invalid(
            Some("Idempotency-Key".into()),
            format!("the Idempotency-Key header must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        )
    })?;
    let key = format!("idem:{tenant}:{given}");
    let ledger = state.ledger.clone();
    let k = key.clone();
    match blocking("idempotency check", move || Ok(ledger.reserve(&k)?)).await? {
        KeyState::Free(guard) => Ok((key, Some(Arc::new(guard)))),
        KeyState::InFlight => Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "idempotency_key_in_use",
            "a request with this Idempotency-Key is still running",
        )),
        KeyState::Done(entry) => {
            let billing = entry.parse().map(|b| billing_json(&b, &entry)).unwrap_or(Value::Null);
            Err(ApiError {
                extra: Some(Box::new([("billing".to_string(), billing)].into_iter().collect())),
                ..ApiError::new(
                    StatusCode::CONFLICT,
                    "invalid_request_error",
                    "idempotency_key_reused",
                    "a request with this Idempotency-Key already completed and was billed once; its billing is attached",
                )
            })
        }
    }
}

/// Runs the router (off the async threads) and returns the routed context.
pub async fn route(
    state: &Shared,
    mut info: RequestInfo,
    key: String,
    guard: Option<Arc<KeyGuard>>,
) -> Result<(Routed, PolicyContext), ApiError> {
    let st = state.clone();
    let asked = info.clone();
    let routed = blocking("routing", move || {
        let pager = st.engine.pager();
        Ok(st.policy.route(&asked, &|a| pager.manifest(a).is_some())?)
    })
    .await?;
    info.adapter_owner = owner_of(state, routed.adapter.as_deref());
    info.adapter = routed.adapter.clone();
    let ctx = PolicyContext { info, routed_by: routed.by.clone(), key, guard };
    Ok((routed, ctx))
}

/// How a request that was served ended.
#[derive(Debug, Clone)]
pub enum Ended {
    /// The engine finished it (or it was cancelled) for this reason.
    Finished(FinishReason),
    /// It failed with this message.
    Failed(String),
}

/// The `billing` object of a response: the entry's charge, splits, deciders and place in the ledger.
pub fn billing_json(body: &EntryBody, stored: &StoredEntry) -> Value {
    json!({
        "request_id": body.request_id,
        "charge": body.charge,
        "splits": body.splits,
        "decided_by": body.deciders,
        "ledger": {"seq": stored.seq, "hash": stored.hash, "outcome": body.outcome},
    })
}

/// Prices and attributes a request that did work and writes its ledger entry durably; returns
/// the `billing` object (`None` when no work was done: nothing is recorded). A policy failure
/// still records the request (with a zero charge) before the error is returned.
pub async fn record(
    state: &Shared,
    ctx: &PolicyContext,
    ended: Ended,
    usage: &Usage,
) -> Result<Option<Value>, ApiError> {
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
    let st = state.clone();
    let ctx = ctx.clone();
    let usage = usage.for_policy();
    let (billing, policy_error) = blocking("settlement", move || {
        let mut deciders = vec![ctx.routed_by.clone()];
        let zero = || Money::new(0, st.config.ledger.currency.clone());
        let (charge, splits, outcome, finish, policy_error) = if outcome == Outcome::Failed {
            (zero(), Vec::new(), outcome, finish, None)
        } else {
            match st.policy.settle(&ctx.info, &usage) {
                Ok(s) => {
                    deciders.extend(s.deciders);
                    (s.charge, s.splits, outcome, finish, None)
                }
                Err(e) => (zero(), Vec::new(), Outcome::Failed, format!("policy: {e}"), Some(e)),
            }
        };
        let body = EntryBody {
            format: ENTRY_FORMAT,
            request_id: ctx.info.request_id.clone(),
            request_key: ctx.key.clone(),
            tenant: ctx.info.tenant.clone(),
            outcome,
            finish,
            base_model: Artifact { name: st.model_name.clone(), sha256: st.engine.model().sha256.clone() },
            adapter: ctx.info.adapter.as_deref().map(|a| Artifact {
                name: a.to_string(),
                sha256: st.engine.pager().manifest(a).map(|m| m.sha256.clone()).unwrap_or_default(),
            }),
            request: ctx.info.clone(),
            usage,
            charge,
            splits,
            deciders,
            finished_at_ms: now_ms(),
        };
        let blobs = body
            .plugin_hashes()
            .into_iter()
            .filter(|sha| st.ledger.needs_blob(sha))
            .filter_map(|sha| st.policy.registry.blob(&sha).map(|b| (sha, b)))
            .collect();
        let entry = NewEntry::new(body, blobs).map_err(|m| ApiError::internal(format!("ledger entry refused: {m}")))?;
        let body = entry.body.clone();
        let billing = match st.ledger.append(entry)? {
            Appended::Written(stored) => billing_json(&body, &stored),
            // Already recorded (a retry of the same key): the first entry stands, charged once.
            Appended::Duplicate(stored) => {
                stored.parse().map(|b| billing_json(&b, &stored)).map_err(ApiError::internal)?
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
