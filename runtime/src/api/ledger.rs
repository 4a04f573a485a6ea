//! Reading the ledger over HTTP: `GET /v1/usage` (a tenant's own usage and charges, with its
//! API key) and, behind the admin token, `/admin/ledger/summary`, `/admin/ledger/export` and
//! `/admin/ledger/verify`.

use std::collections::BTreeMap;

use axum::Json;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::caller::{as_tenant, identify};
use super::{ApiError, Shared, blocking};
use crate::ledger::Filter;
use crate::ledger::report::{Format, GroupBy, export, parse_time, summary};
use crate::ledger::verify::verify_with;
use crate::policy::Replayer;

/// The tenant's ledger route (`/v1/usage`).
pub fn router() -> Router<Shared> {
    Router::new().route("/v1/usage", get(usage))
}

/// The admin ledger routes (the caller puts them behind the admin layer).
pub fn admin_router() -> Router<Shared> {
    Router::new()
        .route("/admin/ledger/summary", get(admin_summary))
        .route("/admin/ledger/export", get(admin_export))
        .route("/admin/ledger/verify", get(admin_verify))
}

type Params = Result<Query<BTreeMap<String, String>>, QueryRejection>;

fn params(q: Params) -> Result<BTreeMap<String, String>, ApiError> {
    q.map(|Query(m)| m).map_err(|e| ApiError::invalid(None, e.body_text()))
}

/// `since` / `until` (Unix seconds or dates), `adapter`, `owner` and, unless fixed by the caller,
/// `tenant`.
fn filter(p: &BTreeMap<String, String>, tenant: Option<String>) -> Result<Filter, ApiError> {
    let time = |name: &str| {
        p.get(name).map(|v| parse_time(v)).transpose().map_err(|m| ApiError::invalid(Some(name.to_string()), m))
    };
    Ok(Filter {
        since_ms: time("since")?,
        until_ms: time("until")?,
        tenant: tenant.or_else(|| p.get("tenant").cloned()),
        adapter: p.get("adapter").filter(|a| !a.is_empty()).cloned(),
        owner: p.get("owner").filter(|o| !o.is_empty()).cloned(),
    })
}

fn group(p: &BTreeMap<String, String>, default: GroupBy) -> Result<GroupBy, ApiError> {
    p.get("by")
        .map(|b| b.parse())
        .transpose()
        .map_err(|m: String| ApiError::invalid(Some("by".into()), m))
        .map(|g| g.unwrap_or(default))
}

async fn summarize(state: &Shared, f: Filter, by: GroupBy) -> Result<Value, ApiError> {
    let ledger = state.ledger.clone();
    let rows = blocking("ledger summary", move || Ok(ledger.report(|s| summary(s, &f, by))?)).await?;
    Ok(json!(rows))
}

/// `GET /v1/usage?by=adapter|payee&since=&until=`: the caller's own requests and charges.
async fn usage(State(state): State<Shared>, headers: HeaderMap, q: Params) -> Result<Json<Value>, ApiError> {
    let caller = identify(&state, &headers).await?;
    let tenant = as_tenant(&state, &caller)?;
    let p = params(q)?;
    let by = group(&p, GroupBy::Adapter)?;
    if by == GroupBy::Tenant {
        return Err(ApiError::invalid(Some("by".into()), "a tenant sees only its own usage: by adapter or payee"));
    }
    let f = filter(&p, Some(tenant.clone()))?;
    let data = summarize(&state, f, by).await?;
    Ok(Json(json!({"object": "list", "tenant": tenant, "data": data})))
}

/// `GET /admin/ledger/summary?by=payee|adapter|tenant&since=&until=&tenant=`.
async fn admin_summary(State(state): State<Shared>, q: Params) -> Result<Json<Value>, ApiError> {
    let p = params(q)?;
    let by = group(&p, GroupBy::Payee)?;
    let data = summarize(&state, filter(&p, None)?, by).await?;
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `GET /admin/ledger/export?format=csv|jsonl&since=&until=&tenant=`.
async fn admin_export(State(state): State<Shared>, q: Params) -> Result<Response, ApiError> {
    let p = params(q)?;
    let format: Format = p
        .get("format")
        .map_or(Ok(Format::Jsonl), |f| f.parse())
        .map_err(|m: String| ApiError::invalid(Some("format".into()), m))?;
    let f = filter(&p, None)?;
    let ledger = state.ledger.clone();
    let bytes = blocking("ledger export", move || {
        let mut out = Vec::new();
        // Long reads get a connection of their own, so requests' usage queries never wait on them.
        export(ledger.location().open()?.as_mut(), &f, format, &mut out)?;
        Ok(out)
    })
    .await?;
    let mime = if format == Format::Csv { "text/csv; charset=utf-8" } else { "application/x-ndjson" };
    Ok(([(header::CONTENT_TYPE, mime)], bytes).into_response())
}

/// `GET /admin/ledger/verify?replay=false`: checks the chain and (by default) replays every entry.
async fn admin_verify(State(state): State<Shared>, q: Params) -> Result<Json<Value>, ApiError> {
    let replay = params(q)?.get("replay").is_none_or(|v| v != "false");
    let st = state.clone();
    let report = blocking("ledger verify", move || {
        let mut replayer = if replay { Some(Replayer::new(&st.config.policy)?) } else { None };
        let name = st.ledger.location().to_string();
        let data_dir = st.config.data_dir.clone().unwrap_or_else(crate::embedded::data_dir);
        let trust = st.config.ledger.trust(&data_dir);
        let mut store = st.ledger.location().open()?;
        let report = verify_with(store.as_mut(), replayer.as_mut().map(|r| r as _), &name, &trust)?;
        let audit_trust = st.config.ledger.audit_trust(&data_dir);
        Ok((report, st.accounts.verify_audit(&audit_trust)?))
    })
    .await?;
    let (report, audit) = report;
    Ok(Json(json!({"ok": report.ok() && audit.ok(), "report": report, "audit": audit})))
}
