//! The policy steps of a request's life in the HTTP layer: route before it is submitted, price
//! and attribute after it finished, and the `billing` object clients receive.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use openlora_sdk::RequestInfo;
use serde_json::{Value, json};

use super::{ApiError, Shared, blocking};
use crate::engine::{GenerationRequest, Usage};
use crate::policy::{Decider, Routed};

/// Most metadata entries a request may carry (as OpenAI allows).
const MAX_METADATA: usize = 16;

/// What a request carries through the policy steps.
#[derive(Debug, Clone)]
pub struct PolicyContext {
    /// What the plugins are told about the request (adapter and owner as routed).
    pub info: RequestInfo,
    /// Who routed it.
    pub routed_by: Decider,
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
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

/// Runs the router (off the async threads) and returns the routed context.
pub async fn route(state: &Shared, mut info: RequestInfo) -> Result<(Routed, PolicyContext), ApiError> {
    let st = state.clone();
    let asked = info.clone();
    let routed = blocking("routing", move || {
        let pager = st.engine.pager();
        Ok(st.policy.route(&asked, &|a| pager.manifest(a).is_some())?)
    })
    .await?;
    info.adapter_owner = owner_of(state, routed.adapter.as_deref());
    info.adapter = routed.adapter.clone();
    let ctx = PolicyContext { info, routed_by: routed.by.clone() };
    Ok((routed, ctx))
}

/// Prices and attributes a finished request; the `billing` object of its response.
pub async fn settle(state: &Shared, ctx: &PolicyContext, usage: &Usage) -> Result<Value, ApiError> {
    let st = state.clone();
    let info = ctx.info.clone();
    let usage = usage.for_policy();
    let settlement = blocking("settlement", move || Ok(st.policy.settle(&info, &usage)?)).await?;
    let mut decided_by = vec![ctx.routed_by.clone()];
    decided_by.extend(settlement.deciders);
    Ok(json!({
        "request_id": ctx.info.request_id,
        "charge": settlement.charge,
        "splits": settlement.splits,
        "decided_by": decided_by,
    }))
}
