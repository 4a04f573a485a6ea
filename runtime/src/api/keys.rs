//! `/admin/keys`, `/admin/owners` and `/admin/audit`: making, listing and revoking keys (the
//! operator any, an owner its contributors'), owners' quotas (the operator), and reading the
//! audit trail (the operator all of it, an owner its own acts). The scoping itself is the
//! accounts layer's; these are its HTTP faces.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, put};
use axum::{Extension, Json, Router};
use serde_json::{Value, json};

use super::{ApiError, ApiPath, ApiQuery, JsonBody, Shared, blocking};
use crate::accounts::{Caller, NewKey, QuotaOverrides};
use crate::ledger::report::parse_time;

/// The routes (behind the admin gate, which hands each handler its [`Caller`]).
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/admin/keys", get(list_keys).post(create_key))
        .route("/admin/keys/{id}", delete(revoke_key))
        .route("/admin/owners", get(owners))
        .route("/admin/owners/{name}", put(set_quotas))
        .route("/admin/audit", get(audit))
}

async fn create_key(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    JsonBody(new): JsonBody<NewKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let accounts = state.accounts.clone();
    let (rec, key) = blocking("create key", move || Ok(accounts.create_key(&caller, new)?)).await?;
    tracing::info!(key_id = %rec.id, scope = rec.scope.as_str(), account = %rec.account, "key created");
    let mut body = json!(rec);
    body["key"] = json!(key);
    Ok((StatusCode::CREATED, Json(body)))
}

async fn list_keys(State(state): State<Shared>, Extension(caller): Extension<Caller>) -> Result<Json<Value>, ApiError> {
    let accounts = state.accounts.clone();
    let keys = blocking("list keys", move || Ok(accounts.list_keys(&caller)?)).await?;
    Ok(Json(json!({"object": "list", "data": keys})))
}

async fn revoke_key(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let accounts = state.accounts.clone();
    let rec = blocking("revoke key", move || Ok(accounts.revoke_key(&caller, &id)?)).await?;
    tracing::info!(key_id = %rec.id, "key revoked");
    Ok(Json(json!({"id": rec.id, "revoked": true, "record": rec})))
}

fn operator_only(caller: &Caller) -> Result<(), ApiError> {
    if caller.is_operator() { Ok(()) } else { Err(ApiError::forbidden("this route is the operator's")) }
}

async fn owners(State(state): State<Shared>, Extension(caller): Extension<Caller>) -> Result<Json<Value>, ApiError> {
    operator_only(&caller)?;
    let st = state.clone();
    let data = blocking("owners", move || {
        let pager = st.engine.pager();
        let mut adapters: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for name in pager.names() {
            if let Some(m) = pager.manifest(&name)
                && let Some(owner) = &m.owner
            {
                let e = adapters.entry(owner.clone()).or_default();
                e.0 += 1;
                e.1 += super::admin::folder_bytes(&m.dir);
            }
        }
        let owners = st.accounts.owners()?;
        Ok(owners
            .into_iter()
            .map(|o| {
                let (n, bytes) = adapters.get(&o.name).copied().unwrap_or_default();
                json!({"name": o.name, "created_at_ms": o.created_at_ms, "quotas": o.quotas, "overrides": o.overrides,
                       "adapters": n, "adapter_bytes": bytes})
            })
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn set_quotas(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
    JsonBody(q): JsonBody<QuotaOverrides>,
) -> Result<Json<Value>, ApiError> {
    operator_only(&caller)?;
    let accounts = state.accounts.clone();
    let owner = blocking("set quotas", move || Ok(accounts.set_quotas(&caller, &name, q)?)).await?;
    Ok(Json(json!(owner)))
}

/// `GET /admin/audit?since=&after=&limit=`.
async fn audit(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let since =
        p.get("since").map(|v| parse_time(v)).transpose().map_err(|m| ApiError::invalid(Some("since".into()), m))?;
    let num = |k: &str, default: u64| {
        p.get(k).map_or(Ok(default), |v| {
            v.parse::<u64>().map_err(|_| ApiError::invalid(Some(k.into()), format!("{k} must be a number")))
        })
    };
    let (after, limit) = (num("after", 0)?, num("limit", 100)?);
    let accounts = state.accounts.clone();
    let records =
        blocking("audit", move || Ok(accounts.audit(&caller, since.unwrap_or(0), after, limit as usize)?)).await?;
    Ok(Json(json!({"object": "list", "data": records})))
}
