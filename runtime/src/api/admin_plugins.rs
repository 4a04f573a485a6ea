//! `/admin/plugins`: upload (validated before anything changes), dry-run, list, activate, roll
//! back and deactivate policy plugins, slot by slot: the operator any slot, an owner its own
//! adapters' `adapter:<name>` slots (the gate of [`super::caller::admin_gate`] checks which).
//! Every change is in the audit trail.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::caller::owns;
use super::{ApiError, ApiPath, ApiQuery, Shared, blocking, is_multipart, multipart_error, upload_error};
use crate::accounts::Caller;
use crate::error::{Error, PolicyError};
use crate::ledger::report::parse_time;
use crate::policy::{Slot, SlotView};

/// Plugin admin routes.
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/admin/plugins", get(list))
        .route("/admin/plugins/{slot}", get(show).post(upload).put(upload).delete(deactivate))
        .route("/admin/plugins/{slot}/config", put(configure))
        .route("/admin/plugins/{slot}/rollback", post(rollback))
        .route("/admin/plugins/{slot}/activate/{version}", post(activate))
        .route("/admin/plugins/{slot}/versions/{version}", delete(remove_version))
        .route("/admin/plugins/{slot}/dry-run", post(dry_run))
}

fn slot(name: &str) -> Result<Slot, ApiError> {
    name.parse().map_err(|m: String| ApiError::invalid(Some("slot".into()), m))
}

fn bad_upload(m: String) -> ApiError {
    ApiError { code: "invalid_plugin", ..ApiError::invalid(Some("body".into()), m) }
}

/// Whether `caller` may see `slot`: the operator every slot, an owner its adapters' (the gate
/// has checked any slot in the path; lists are filtered here).
fn visible(state: &Shared, caller: &Caller, slot: &Slot) -> bool {
    match (caller, slot) {
        (Caller::Owner { name, .. }, Slot::Adapter(adapter)) => owns(state, name, adapter) == Some(true),
        (Caller::Owner { .. }, _) => false,
        _ => true,
    }
}

/// Every slot `caller` may see, those without a plugin too (their built-in answers): the
/// operator's three slots and every installed one for the operator, an owner's adapters' slots
/// for an owner.
fn views(state: &Shared, caller: &Caller) -> Vec<SlotView> {
    let mut views: std::collections::BTreeMap<Slot, SlotView> = state
        .policy
        .list()
        .into_iter()
        .filter(|v| visible(state, caller, &v.slot))
        .map(|v| (v.slot.clone(), v))
        .collect();
    let empty: Vec<Slot> = match caller {
        Caller::Owner { name, .. } => state
            .engine
            .pager()
            .names()
            .into_iter()
            .filter(|a| owns(state, name, a) == Some(true))
            .map(Slot::Adapter)
            .collect(),
        _ => vec![Slot::Router, Slot::Pricer, Slot::Attributor],
    };
    for slot in empty {
        views.entry(slot.clone()).or_insert_with(|| SlotView::empty(slot));
    }
    views.into_values().collect()
}

async fn list(State(state): State<Shared>, Extension(caller): Extension<Caller>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"object": "list", "data": views(&state, &caller)})))
}

async fn show(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let slot = slot(&name)?;
    let known = match &slot {
        Slot::Adapter(a) => state.engine.pager().manifest(a).is_some(),
        _ => true,
    };
    let view = views(&state, &caller).into_iter().find(|v| v.slot == slot);
    let view = view.or_else(|| known.then(|| SlotView::empty(slot.clone())));
    let view = view.ok_or_else(|| ApiError::from(Error::from(PolicyError::UnknownPlugin(format!("slot {slot}")))))?;
    Ok(Json(json!(view)))
}

/// `?config=` of a raw upload.
#[derive(Debug, Deserialize)]
struct UploadQuery {
    config: Option<String>,
}

/// A component and its configuration from a request: the raw body (config in `?config=`), or a
/// multipart form with a `plugin` file part and an optional `config` part (JSON).
async fn component(
    state: &Shared,
    headers: &HeaderMap,
    query: UploadQuery,
    req: Request,
) -> Result<(Vec<u8>, String), ApiError> {
    let (bytes, config) = if is_multipart(headers) {
        let mut form =
            Multipart::from_request(req, state).await.map_err(|r| upload_error(r.status(), r.body_text()))?;
        let (mut bytes, mut config) = (None, query.config);
        while let Some(field) = form.next_field().await.map_err(|e| multipart_error("bad multipart body", e))? {
            let field_name = field.name().unwrap_or_default().to_string();
            let data = field.bytes().await.map_err(|e| multipart_error(&format!("reading `{field_name}`"), e))?;
            match field_name.as_str() {
                "plugin" | "file" => bytes = Some(data.to_vec()),
                "config" => {
                    config =
                        Some(String::from_utf8(data.to_vec()).map_err(|_| bad_upload("config is not UTF-8".into()))?)
                }
                _ => {}
            }
        }
        (bytes.ok_or_else(|| bad_upload("the form has no `plugin` part".into()))?, config)
    } else {
        let body = Bytes::from_request(req, state).await.map_err(|r| upload_error(r.status(), r.body_text()))?;
        (body.to_vec(), query.config)
    };
    Ok((bytes, plugin_config(&config.unwrap_or_default())?))
}

/// A plugin configuration as given, checked to be JSON (or empty: none). Surrounding whitespace
/// (a file's trailing newline) does not make another version.
fn plugin_config(text: &str) -> Result<String, ApiError> {
    let config = text.trim();
    if !config.is_empty() && serde_json::from_str::<Value>(config).is_err() {
        return Err(ApiError::invalid(Some("config".into()), "the plugin config must be JSON"));
    }
    Ok(config.to_string())
}

/// `POST|PUT /admin/plugins/{slot}`: installs a component (see [`component`]) and makes it active.
async fn upload(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    req: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let slot = slot(&name)?;
    let _one = begin_install(&state, &caller).await?;
    let (bytes, config) = component(&state, &headers, query, req).await?;
    let info = install(&state, &caller, &slot, (bytes, config), None).await?;
    Ok((StatusCode::CREATED, Json(json!({"slot": slot, "active": info}))))
}

/// `PUT /admin/plugins/{slot}/config`: the slot's active component again with the configuration
/// in the body (JSON; empty for none), as a new version made active — a configuration change
/// without re-uploading the wasm. Validated as an upload is; nothing changes if it fails.
async fn configure(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let slot = slot(&name)?;
    let _one = begin_install(&state, &caller).await?;
    let text = std::str::from_utf8(&body).map_err(|_| bad_upload("config is not UTF-8".into()))?;
    let config = plugin_config(text)?;
    let active = state.policy.list().into_iter().find(|v| v.slot == slot).and_then(|v| {
        let version = v.active?;
        v.versions.into_iter().find(|i| i.version == version)
    });
    let no_plugin = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "no_active_plugin",
            format!("slot {slot} has no active plugin to configure; upload one"),
        )
    };
    let active = active.ok_or_else(no_plugin)?;
    let bytes = state.policy.blob(&active.sha256).ok_or_else(no_plugin)?;
    let info = install(&state, &caller, &slot, (bytes, config), Some(active.version)).await?;
    Ok((StatusCode::CREATED, Json(json!({"slot": slot, "active": info, "from_version": active.version}))))
}

/// Starts an install by `caller`: an owner's installs run one at a time (the guard returned), so
/// its hourly quota, checked here, counts each of them.
async fn begin_install(state: &Shared, caller: &Caller) -> Result<Option<tokio::sync::OwnedMutexGuard<()>>, ApiError> {
    let one = state.owner_lock(caller).await;
    let (accounts, by) = (state.accounts.clone(), caller.clone());
    blocking("install quota", move || Ok(accounts.check_install_quota(&by)?)).await?;
    Ok(one)
}

/// Installs `bytes` with `config` in `slot` for `caller` (an owner's adapter must still be its
/// own when the version goes in) and records it in the audit trail as `plugin.install` (which
/// the hourly quota counts). A configuration change names the version it started `from`: should
/// another change have made a different version active meanwhile, nothing is installed (409).
async fn install(
    state: &Shared,
    caller: &Caller,
    slot: &Slot,
    component: (Vec<u8>, String),
    from: Option<u32>,
) -> Result<crate::policy::VersionInfo, ApiError> {
    // Once begun, it ends (installed, published, audited) even if its client goes away.
    let (state, caller, slot) = (state.clone(), caller.clone(), slot.clone());
    super::detached(async move { install_now(&state, &caller, &slot, component, from).await }).await
}

/// [`install`]'s work.
async fn install_now(
    state: &Shared,
    caller: &Caller,
    slot: &Slot,
    (bytes, config): (Vec<u8>, String),
    from: Option<u32>,
) -> Result<crate::policy::VersionInfo, ApiError> {
    let _serial = state.serial_change().await;
    let (st, slot2, by) = (state.clone(), slot.clone(), caller.clone());
    let info = blocking("upload", move || {
        let allowed = |active: Option<u32>| match (&by, &slot2) {
            (Caller::Owner { name, .. }, Slot::Adapter(a)) if owns(&st, name, a) != Some(true) => {
                Err(crate::Error::from(crate::error::AccountError::NotFound(format!("no adapter `{a}` of yours"))))
            }
            _ if from.is_some() && active != from => Err(crate::Error::from(crate::error::AccountError::Changed(
                format!("slot {slot2}'s active version changed while its configuration was being changed; try again"),
            ))),
            _ => Ok(()),
        };
        Ok(st.policy.install_guarded(&slot2, &bytes, &config, &by.actor(), &allowed)?)
    })
    .await?;
    let detail = match from {
        Some(v) => format!("version={} configured from={v}", info.version),
        None => format!("version={}", info.version),
    };
    state.audit(caller, "plugin.install", &slot.to_string(), Some(&info.sha256), detail).await?;
    Ok(info)
}

/// `?limit=&since=&until=` of a dry-run.
#[derive(Debug, Deserialize)]
struct DryRunQuery {
    config: Option<String>,
    limit: Option<usize>,
    since: Option<String>,
    until: Option<String>,
}

/// `POST /admin/plugins/{slot}/dry-run?limit=N&since=&until=`: runs a candidate attributor (sent
/// as for an install) on the adapter's latest `N` entries (default 100, at most 1000; written in
/// the range, when given) in the sandbox, and
/// reports what it would have paid beside what was paid. Nothing is installed.
async fn dry_run(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DryRunQuery>,
    req: Request,
) -> Result<Json<Value>, ApiError> {
    let slot = slot(&name)?;
    let Slot::Adapter(adapter) = slot.clone() else {
        return Err(ApiError::invalid(Some("slot".into()), "dry-runs are for adapters' `adapter:<name>` slots"));
    };
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let time = |v: &Option<String>, name: &str| {
        v.as_deref().map(parse_time).transpose().map_err(|m| ApiError::invalid(Some(name.to_string()), m))
    };
    let range = (time(&query.since, "since")?, time(&query.until, "until")?);
    let _permit = state.report_permit()?;
    let (bytes, config) = component(&state, &headers, UploadQuery { config: query.config }, req).await?;
    let st = state.clone();
    let report = blocking("dry-run", move || {
        let entries = st.accounts.report(|db| crate::ledger::explain::latest_of_adapter(db, &adapter, range, limit))?;
        // An owner's dry-run reads only the entries of its own time as the adapter's owner.
        let entries: Vec<_> = entries
            .into_iter()
            .filter(|e| match &caller {
                Caller::Owner { name, .. } => {
                    e.parse().is_ok_and(|b| b.request.adapter_owner.as_deref() == Some(name.as_str()))
                }
                _ => true,
            })
            .collect();
        Ok(st.policy.dry_run(&slot, &bytes, &config, &entries)?)
    })
    .await?;
    Ok(Json(json!(report)))
}

async fn rollback(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let slot = slot(&name)?;
    let _serial = state.serial_change().await;
    let (st, slot2) = (state.clone(), slot.clone());
    let active = blocking("rollback", move || Ok(st.policy.rollback(&slot2)?)).await?;
    let (sha, detail) = active
        .as_ref()
        .map_or((None, "none active".to_string()), |a| (Some(a.sha256.as_str()), format!("version={}", a.version)));
    state.audit(&caller, "plugin.rollback", &slot.to_string(), sha, detail).await?;
    Ok(Json(json!({"slot": slot, "active": active})))
}

async fn activate(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    ApiPath((name, version)): ApiPath<(String, u32)>,
) -> Result<Json<Value>, ApiError> {
    let slot = slot(&name)?;
    let _serial = state.serial_change().await;
    let (st, slot2) = (state.clone(), slot.clone());
    let active = blocking("activate", move || Ok(st.policy.activate(&slot2, version)?)).await?;
    let detail = format!("version={version}");
    state.audit(&caller, "plugin.activate", &slot.to_string(), Some(&active.sha256), detail).await?;
    Ok(Json(json!({"slot": slot, "active": active})))
}

async fn remove_version(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    ApiPath((name, version)): ApiPath<(String, u32)>,
) -> Result<Json<Value>, ApiError> {
    let slot = slot(&name)?;
    let _serial = state.serial_change().await;
    let (st, slot2) = (state.clone(), slot.clone());
    blocking("remove version", move || Ok(st.policy.remove_version(&slot2, version)?)).await?;
    state.audit(&caller, "plugin.remove_version", &slot.to_string(), None, format!("version={version}")).await?;
    Ok(Json(json!({"slot": slot, "removed": version})))
}

async fn deactivate(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let slot = slot(&name)?;
    let _serial = state.serial_change().await;
    state.policy.deactivate(&slot)?;
    state.audit(&caller, "plugin.deactivate", &slot.to_string(), None, String::new()).await?;
    Ok(Json(json!({"slot": slot, "active": null})))
}
