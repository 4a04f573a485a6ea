//! What third parties read: an owner's or a contributor's earnings (`/v1/earnings`, and its
//! export), and `explain` of one ledger entry for any party it names
//! (`/v1/ledger/entries/{request_id}/explain`).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::caller::identify;
use super::{ApiError, ApiPath, ApiQuery, Shared, blocking};
use crate::accounts::Caller;
use crate::ledger::EntryBody;
use crate::ledger::earnings::{self, EarningsBy};
use crate::ledger::explain;
use crate::ledger::report::parse_time;
use crate::policy::Replayer;

/// The routes.
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/v1/earnings", get(earnings_by))
        .route("/v1/earnings/export", get(export))
        .route("/v1/ledger/entries/{request_id}/explain", get(explain_entry))
}

/// Whose earnings a caller reads: an owner all of its own, a contributor its payee's of its owner's.
fn whose(caller: &Caller) -> Result<(String, Option<String>), ApiError> {
    match caller {
        Caller::Owner { name, .. } => Ok((name.clone(), None)),
        Caller::Contributor { owner, payee, .. } => Ok((owner.clone(), Some(payee.clone()))),
        _ => Err(ApiError::forbidden("earnings are read with an owner's or a contributor's key")),
    }
}

type Params = BTreeMap<String, String>;

async fn rows(
    state: &Shared,
    caller: &Caller,
    p: &Params,
) -> Result<(String, Option<String>, Vec<earnings::EarningRow>), ApiError> {
    let (owner, payee) = whose(caller)?;
    let _permit = state.report_permit()?;
    let time = |k: &str| p.get(k).map(|v| parse_time(v)).transpose().map_err(|m| ApiError::invalid(Some(k.into()), m));
    let (since, until) = (time("since")?, time("until")?);
    let (accounts, o, pay) = (state.accounts.clone(), owner.clone(), payee.clone());
    let rows =
        blocking("earnings", move || Ok(accounts.report(|db| earnings::rows(db, &o, pay.as_deref(), since, until))?))
            .await?;
    Ok((owner, payee, rows))
}

/// `GET /v1/earnings?by=adapter|payee|day&since=&until=`.
async fn earnings_by(
    State(state): State<Shared>,
    headers: HeaderMap,
    q: Result<ApiQuery<Params>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    // Who asks first: a caller without a key learns nothing about its query.
    let caller = identify(&state, &headers).await?;
    let ApiQuery(p) = q?;
    let by: EarningsBy = p
        .get("by")
        .map_or(Ok(EarningsBy::Payee), |b| b.parse())
        .map_err(|m: String| ApiError::invalid(Some("by".into()), m))?;
    let (owner, payee, rows) = rows(&state, &caller, &p).await?;
    let by_name = p.get("by").cloned().unwrap_or_else(|| "payee".into());
    Ok(Json(
        json!({"object": "list", "owner": owner, "payee": payee, "by": by_name, "data": earnings::group(&rows, by)}),
    ))
}

/// `GET /v1/earnings/export?format=csv|jsonl&since=&until=`: one row per day, adapter and payee.
async fn export(
    State(state): State<Shared>,
    headers: HeaderMap,
    q: Result<ApiQuery<Params>, ApiError>,
) -> Result<Response, ApiError> {
    let caller = identify(&state, &headers).await?;
    let ApiQuery(p) = q?;
    let format = p.get("format").map_or("csv", String::as_str).to_string();
    if format != "csv" && format != "jsonl" {
        return Err(ApiError::invalid(Some("format".into()), "format is csv or jsonl"));
    }
    let (_, _, rows) = rows(&state, &caller, &p).await?;
    Ok(if format == "csv" {
        ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], earnings::csv(&earnings::payouts(&rows))).into_response()
    } else {
        let lines: String = earnings::payouts(&rows).iter().map(|r| format!("{}\n", json!(r))).collect();
        ([(header::CONTENT_TYPE, "application/x-ndjson")], lines).into_response()
    })
}

/// Whether `caller` is a party the entry names: the operator, its tenant, its adapter's owner, or
/// a contributor of that owner whose payee it pays.
pub fn may_read(caller: &Caller, e: &EntryBody) -> bool {
    let owner = e.request.adapter_owner.as_deref();
    match caller {
        Caller::Operator | Caller::Cli => true,
        Caller::Tenant { name, .. } => *name == e.tenant,
        Caller::Owner { name, .. } => owner == Some(name.as_str()),
        Caller::Contributor { owner: o, payee, .. } => {
            owner == Some(o.as_str()) && e.splits.iter().any(|s| &s.payee == payee)
        }
    }
}

/// `GET /v1/ledger/entries/{request_id}/explain`: 404 for anyone the entry does not name.
async fn explain_entry(
    State(state): State<Shared>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = identify(&state, &headers).await?;
    let not_found = || {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            format!("no ledger entry of yours for request `{id}`"),
        )
    };
    if id.len() > 128 {
        return Err(not_found());
    }
    let (st, rid) = (state.clone(), id.clone());
    let explained = blocking("explain", move || {
        let Some(entry) = st.accounts.report(|db| explain::find(db, &rid))? else { return Ok(None) };
        // Nobody but a party to the entry makes the server replay it.
        if !entry.parse().is_ok_and(|b| may_read(&caller, &b)) {
            return Ok(None);
        }
        // One replayer for every explain, so each plugin is compiled once.
        let mut replayer = st.replayer.lock().unwrap_or_else(|p| p.into_inner());
        if replayer.is_none() {
            *replayer = Some(Replayer::new(&st.config.policy)?);
        }
        let replayer = replayer.as_mut().ok_or_else(|| ApiError::internal("no replayer"))?;
        let accounts = st.accounts.clone();
        let mut blobs = |sha: &str| accounts.report(|db| explain::blob(db, sha));
        Ok(Some(explain::explain(&entry, replayer, &mut blobs).map_err(ApiError::internal)?))
    })
    .await?;
    explained.map(|e| Json(json!(e))).ok_or_else(not_found)
}
