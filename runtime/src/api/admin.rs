//! `/admin/adapters`: adapter upload, listing and deletion, by the operator (the admin token)
//! or by an owner for its own adapters, within its quotas (the gate in front of every admin
//! route, [`super::caller::admin_gate`], checks the scope). An upload that fails validation
//! changes nothing; every change is in the audit trail.

use std::path::Path;

use axum::Router;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::listen::BodyRead;
use super::upload::{stage_form, stage_tar};
use super::{ApiError, ApiPath, ApiQuery, Shared, blocking, is_multipart, upload_error};
use crate::accounts::Caller;
use crate::adapters::store::{Held, write_synced};
use crate::adapters::{AdapterManifest, OWNER_FILE, valid_owner};
use crate::error::AccountError;

/// Admin routes (the caller layers the upload size limit).
pub fn router() -> Router<Shared> {
    Router::new().route("/admin/adapters", get(list_adapters)).route(
        "/admin/adapters/{name}",
        get(get_adapter).post(upload_adapter).put(upload_adapter).delete(delete_adapter),
    )
}

/// Refuses a name an adapter may not have (400).
pub(super) fn valid_name(state: &Shared, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !ok {
        return Err(ApiError::invalid(Some("name".into()), "adapter names are 1-64 characters of A-Z a-z 0-9 - _ ."));
    }
    if name == state.model_name {
        return Err(ApiError::invalid(Some("name".into()), "that is the base model's name"));
    }
    Ok(())
}

fn describe(name: &str, m: &AdapterManifest) -> Value {
    let mut modules: Vec<&str> = m.modules.iter().map(|(_, p)| p.module_name()).collect();
    modules.sort_unstable();
    modules.dedup();
    let mut layers: Vec<usize> = m.modules.iter().map(|(l, _)| *l).collect();
    layers.dedup();
    json!({
        "name": name,
        "rank": m.config.rank,
        "lora_alpha": m.config.alpha,
        "use_rslora": m.config.use_rslora,
        "target_modules": modules,
        "layers": layers.len(),
        "bytes": m.f32_bytes,
        "base_model_name_or_path": m.config.base_model_name_or_path,
        "owner": m.owner,
        "sha256": m.sha256,
    })
}

/// The bytes of the files in a folder (not its subfolders).
pub fn folder_bytes(dir: &Path) -> u64 {
    let files = std::fs::read_dir(dir).into_iter().flatten().flatten();
    files.filter_map(|f| f.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
}

/// The adapters an owner has (name, folder), but `except`.
fn owned_by(state: &Shared, owner: &str, except: &str) -> Vec<(String, std::path::PathBuf)> {
    let pager = state.engine.pager();
    pager
        .names()
        .into_iter()
        .filter(|n| n != except)
        .filter_map(|n| pager.manifest(&n).filter(|m| m.owner.as_deref() == Some(owner)).map(|m| (n, m.dir.clone())))
        .collect()
}

/// The owner an upload is made by, when an owner makes it.
fn uploader(caller: &Caller) -> Option<&str> {
    match caller {
        Caller::Owner { name, .. } => Some(name),
        _ => None,
    }
}

async fn list_adapters(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let pager = state.engine.pager();
    let mine = |m: &AdapterManifest| uploader(&caller).is_none_or(|o| m.owner.as_deref() == Some(o));
    let data: Vec<Value> = pager
        .names()
        .into_iter()
        .filter_map(|n| pager.manifest(&n).filter(|m| mine(m)).map(|m| describe(&n, &m)))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn get_adapter(State(state): State<Shared>, ApiPath(name): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let m = state.engine.pager().manifest(&name).ok_or_else(|| ApiError::model_not_found(&name))?;
    Ok(Json(describe(&name, &m)))
}

async fn delete_adapter(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    if !remove_adapter(&state, &caller, &name).await? {
        return Err(ApiError::model_not_found(&name));
    }
    Ok(Json(json!({"id": name, "object": "adapter", "deleted": true})))
}

/// Removes an uploaded adapter and its owner's slot, recording it in the audit trail; `false`
/// when there was no such upload. Requests already using it hold its manifest and finish first
/// (its files stay until then); new ones get 404. An adapter the config file names is the
/// operator's file to edit (409); deleting an upload that shadowed one brings the configured one
/// back.
pub(super) async fn remove_adapter(state: &Shared, caller: &Caller, name: &str) -> Result<bool, ApiError> {
    // It ends (removed, audited, published) even if its client goes away.
    let (state, caller, name) = (state.clone(), caller.clone(), name.to_string());
    super::detached(async move { remove_now(&state, &caller, &name).await }).await
}

/// [`remove_adapter`]'s work.
async fn remove_now(state: &Shared, caller: &Caller, name: &str) -> Result<bool, ApiError> {
    let _serial = state.serial_change().await;
    let (st, gone) = (state.clone(), name.to_string());
    let removed = blocking("delete adapter", move || remove_upload(&st, &gone)).await?;
    // Gone here but not yet from the other replicas (its publication failed): publish it now.
    let (st, gone) = (state.clone(), name.to_string());
    let unpublished = !removed
        && state.engine.pager().manifest(name).is_none()
        && blocking("replicas", move || {
            Ok(st.replication.as_ref().map(|r| r.has_adapter(&gone)).transpose()?.unwrap_or(false))
        })
        .await?;
    if !removed && !unpublished {
        if state.engine.pager().manifest(name).is_some() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "adapter_configured",
                format!("adapter `{name}` is named in the server's config file; remove it there"),
            ));
        }
        return Ok(false);
    }
    state.audit(caller, "adapter.delete", name, None, String::new()).await?;
    Ok(true)
}

/// Removes the uploaded adapter `name` (blocking): unregistered (the configured one of that name,
/// if any, back in its place), its owner's slot forgotten; `false` when no upload has the name.
pub(super) fn remove_upload(state: &crate::api::AppState, name: &str) -> Result<bool, ApiError> {
    let pager = state.engine.pager();
    let removed = state
        .adapter_store
        .remove(name, || {
            let held = pager.manifest(name).map(|m| m as Held);
            match state.config.adapters.get(name) {
                Some(dir) => {
                    if let Err(e) = pager.register(name, dir) {
                        tracing::warn!(adapter = %name, error = %e, "the configured adapter did not come back");
                        pager.unregister(name);
                    }
                }
                None => {
                    pager.unregister(name);
                }
            }
            held
        })
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if removed {
        // Its owner's attributor goes with it: a later adapter of this name starts with none.
        state.policy.forget_adapter(name);
    }
    Ok(removed)
}

/// `?owner=` of an adapter upload.
#[derive(Debug, Deserialize)]
struct UploadQuery {
    owner: Option<String>,
}

/// `POST|PUT /admin/adapters/{name}[?owner=NAME]`: the PEFT folder as a tar archive, or as a
/// multipart form with `adapter_config.json` and `adapter_model.safetensors` parts (and optionally
/// `openlora.json`, `{"owner": ...}`, which `?owner=` overrides).
async fn upload_adapter(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiQuery(mut query): ApiQuery<UploadQuery>,
    req: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    valid_name(&state, &name)?;
    let _one = state.owner_lock(&caller).await;
    let quotas = begin_upload(&state, &caller, &name, &mut query.owner).await?;
    let stage = state.adapter_store.stage().map_err(|e| ApiError::internal(e.to_string()))?;
    let read = BodyRead {
        limit: state.config.limits.max_upload_bytes,
        pause: std::time::Duration::from_secs(state.config.limits.body_timeout_secs as u64),
    };
    let staged = async {
        if is_multipart(&headers) {
            let form =
                Multipart::from_request(req, &state).await.map_err(|r| upload_error(r.status(), r.body_text()))?;
            stage_form(form, &stage, read).await
        } else {
            stage_tar(req.into_body(), &stage, read).await
        }
    }
    .await;
    if let Err(e) = staged {
        let _ = std::fs::remove_dir_all(&stage);
        return Err(e);
    }
    let (replaced, manifest) =
        finish_upload(&state, &caller, &name, (&stage, query.owner), quotas, "adapter.upload").await?;
    let status = if replaced { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(describe(&name, &manifest))))
}

/// Checks an upload of `name` by `caller` before anything is read: an owner uploads as itself
/// (`owner` is set to it) within its adapter count; returns its quotas (none for the operator).
/// The caller holds the owner's lock ([`super::AppState::owner_lock`]) until the upload ends.
pub(super) async fn begin_upload(
    state: &Shared,
    caller: &Caller,
    name: &str,
    owner: &mut Option<String>,
) -> Result<Option<crate::accounts::Quotas>, ApiError> {
    if let Some(o) = owner.as_deref()
        && !valid_owner(o)
    {
        return Err(ApiError::invalid(Some("owner".into()), "owners are 1-64 characters of A-Z a-z 0-9 - _ . @"));
    }
    let Some(me) = uploader(caller) else { return Ok(None) };
    if owner.as_deref().is_some_and(|o| o != me) {
        return Err(ApiError::forbidden("an owner uploads adapters as itself"));
    }
    *owner = Some(me.to_string());
    let (st, who, named) = (state.clone(), me.to_string(), name.to_string());
    let (quotas, have) =
        blocking("quotas", move || Ok((st.accounts.quotas(&who)?, owned_by(&st, &who, &named).len() as u64))).await?;
    if have >= quotas.max_adapters {
        return Err(ApiError::from(crate::Error::from(AccountError::Quota {
            message: format!("owner `{me}` may have {} adapters; delete one first", quotas.max_adapters),
            size: false,
            retry_after: None,
        })));
    }
    Ok(Some(quotas))
}

/// Ends an upload whose files are in `stage`: records `owner`, holds an owner to its byte
/// quota, validates and commits it (see [`store`]) and writes `action` in the audit trail. The
/// stage is gone afterwards, whatever happened. Returns whether a version was replaced.
pub(super) async fn finish_upload(
    state: &Shared,
    caller: &Caller,
    name: &str,
    (stage, owner): (&Path, Option<String>),
    quotas: Option<crate::accounts::Quotas>,
    action: &'static str,
) -> Result<(bool, std::sync::Arc<AdapterManifest>), ApiError> {
    // Once the body is read, the upload ends (committed, audited, published) even if its
    // client goes away: the rest runs as a task of its own.
    let (state, caller, name, stage) = (state.clone(), caller.clone(), name.to_string(), stage.to_path_buf());
    super::detached(async move { commit_upload(&state, &caller, &name, (stage, owner), quotas, action).await }).await
}

/// [`finish_upload`]'s work.
async fn commit_upload(
    state: &Shared,
    caller: &Caller,
    name: &str,
    (stage, owner): (std::path::PathBuf, Option<String>),
    quotas: Option<crate::accounts::Quotas>,
    action: &'static str,
) -> Result<(bool, std::sync::Arc<AdapterManifest>), ApiError> {
    if let Some(owner) = owner {
        let written = write_synced(&stage.join(OWNER_FILE), json!({ "owner": owner }).to_string().as_bytes());
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&stage);
            return Err(ApiError::internal(e.to_string()));
        }
    }
    if let (Some(q), Some(me)) = (quotas, uploader(caller)) {
        let (st, who, named, staging) = (state.clone(), me.to_string(), name.to_string(), stage.clone());
        let (used, staged) = blocking("quota", move || {
            let used: u64 = owned_by(&st, &who, &named).iter().map(|(_, dir)| folder_bytes(dir)).sum();
            Ok((used, folder_bytes(&staging)))
        })
        .await?;
        if used.saturating_add(staged) > q.max_adapter_bytes {
            let _ = std::fs::remove_dir_all(&stage);
            return Err(ApiError::from(crate::Error::from(AccountError::Quota {
                message: format!(
                    "owner `{me}`'s adapters may take {} bytes; they take {used} and this upload {staged}",
                    q.max_adapter_bytes
                ),
                size: true,
                retry_after: None,
            })));
        }
    }
    let (state2, name2) = (state.clone(), name.to_string());
    let me = uploader(caller).map(str::to_string);
    let _serial = state.serial_change().await;
    let (replaced, manifest) = blocking("upload", move || store(&state2, &name2, &stage, me.as_deref())).await?;
    let detail =
        format!("{} owner={}", if replaced { "replaced" } else { "created" }, manifest.owner.as_deref().unwrap_or("-"));
    state.audit(caller, action, name, Some(&manifest.sha256), detail).await?;
    Ok((replaced, manifest))
}

/// Validates the upload as the engine would load it, then commits it as the name's current
/// version (serialised with every other write to the store): a refused upload changes nothing.
/// An owner's upload (`uploader`) may replace only its own adapter, checked in the same commit.
pub(super) fn store(
    state: &crate::api::AppState,
    name: &str,
    tmp: &Path,
    uploader: Option<&str>,
) -> Result<(bool, std::sync::Arc<AdapterManifest>), ApiError> {
    let adapters = &state.adapter_store;
    let cleanup = |e: ApiError| {
        let _ = std::fs::remove_dir_all(tmp);
        e
    };
    // Validate before anything is renamed or registered: a bad upload changes nothing. Its
    // messages name the upload's files, never the server's folders.
    let scrub = |e: crate::Error| {
        let mut e = ApiError { code: "invalid_adapter", ..ApiError::from(e) };
        e.message = e.message.replace(&format!("{}/", tmp.display()), "").replace(&tmp.display().to_string(), "upload");
        cleanup(e)
    };
    AdapterManifest::inspect(tmp, state.engine.model().config()).map_err(scrub)?;
    let pager = state.engine.pager();
    let mut stored = None;
    let committed = adapters
        .commit(name, tmp, |dir| {
            let previous = pager.manifest(name).map(|m| m as Held);
            if let (Some(me), Some(p)) = (uploader, pager.manifest(name))
                && p.owner.as_deref() != Some(me)
            {
                return Err(
                    AccountError::Conflict(format!("the adapter name `{name}` is taken; choose another")).into()
                );
            }
            pager.register(name, dir)?;
            stored = pager.manifest(name);
            Ok(previous)
        })
        .map_err(|e| {
            let _ = std::fs::remove_dir_all(tmp);
            match e {
                e @ crate::Error::Submit(crate::error::SubmitError::AdapterTooLarge { .. }) => ApiError {
                    param: Some("body".into()),
                    ..ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "invalid_request_error",
                        "adapter_too_large",
                        e.to_string(),
                    )
                },
                e @ (crate::Error::Load(_) | crate::Error::Config { .. }) => {
                    ApiError { code: "invalid_adapter", ..ApiError::from(e) }
                }
                e @ crate::Error::Account(_) => ApiError { param: Some("name".into()), ..ApiError::from(e) },
                e => ApiError::internal(e.to_string()),
            }
        })?;
    let manifest = stored.ok_or_else(|| ApiError::internal("adapter vanished after registration"))?;
    Ok((committed.replaced, manifest))
}
