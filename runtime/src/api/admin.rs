//! `/admin`: adapter upload, listing and deletion, behind a bearer admin token separate from
//! inference keys. An upload that fails validation changes nothing.

use std::io::Read;
use std::path::{Path, PathBuf};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use serde_json::{Value, json};

use super::{ApiError, Shared, bearer};
use crate::adapters::{AdapterManifest, CONFIG_FILE, WEIGHTS_FILE};

/// Admin routes (the caller layers the upload size limit).
pub fn router() -> Router<Shared> {
    Router::new().route("/admin/adapters", get(list_adapters)).route(
        "/admin/adapters/{name}",
        get(get_adapter).post(upload_adapter).put(upload_adapter).delete(delete_adapter),
    )
}

fn authorize(state: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.config.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "admin_disabled",
            "the admin API is disabled (set admin_token in the config file)",
        ));
    };
    match bearer(headers) {
        // Constant-time comparison: the token is a secret.
        Some(given)
            if given.len() == token.len()
                && given.bytes().zip(token.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0 =>
        {
            Ok(())
        }
        _ => Err(ApiError::unauthorized("invalid admin token")),
    }
}

fn valid_name(state: &Shared, name: &str) -> Result<(), ApiError> {
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
    })
}

async fn list_adapters(State(state): State<Shared>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let pager = state.engine.pager();
    let data: Vec<Value> =
        pager.names().into_iter().filter_map(|n| pager.manifest(&n).map(|m| describe(&n, &m))).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn get_adapter(
    State(state): State<Shared>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let m = state.engine.pager().manifest(&name).ok_or_else(|| ApiError::model_not_found(&name))?;
    Ok(Json(describe(&name, &m)))
}

async fn delete_adapter(
    State(state): State<Shared>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    // Requests already using it hold a lease and finish first; new ones get 404.
    if !state.engine.pager().unregister(&name) {
        return Err(ApiError::model_not_found(&name));
    }
    Ok(Json(json!({"id": name, "object": "adapter", "deleted": true})))
}

/// Unpacks the two PEFT files from a tar archive (optionally inside one folder) into `dir`.
fn unpack(archive: &[u8], dir: &Path) -> Result<(), ApiError> {
    let bad = |m: String| ApiError { code: "invalid_adapter", ..ApiError::invalid(Some("body".into()), m) };
    let mut tar = tar::Archive::new(archive);
    let entries = tar.entries().map_err(|e| bad(format!("not a tar archive: {e}")))?;
    let mut found = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("corrupt tar archive: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(|e| bad(format!("bad path in archive: {e}")))?.into_owned();
        let Some(file) = path.file_name().and_then(|f| f.to_str()).map(str::to_string) else { continue };
        if file != CONFIG_FILE && file != WEIGHTS_FILE && file != "adapter_model.bin" {
            continue; // READMEs and the like
        }
        if found.contains(&file) {
            return Err(bad(format!("the archive holds `{file}` twice")));
        }
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(|e| bad(format!("reading `{file}` from the archive: {e}")))?;
        std::fs::write(dir.join(&file), bytes).map_err(|e| ApiError::internal(format!("writing upload: {e}")))?;
        found.push(file);
    }
    Ok(())
}

/// `POST|PUT /admin/adapters/{name}` with a tar of the PEFT folder as the body.
async fn upload_adapter(
    State(state): State<Shared>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    authorize(&state, &headers)?;
    valid_name(&state, &name)?;
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(r.status(), "invalid_request_error", "request_too_large", "the upload is too large")
        } else {
            ApiError::invalid(None, r.body_text())
        }
    })?;
    let state2 = state.clone();
    let name2 = name.clone();
    // Disk and validation work off the async runtime.
    let result = tokio::task::spawn_blocking(move || store(&state2, &name2, &body))
        .await
        .map_err(|e| ApiError::internal(format!("upload task: {e}")))?;
    let (replaced, manifest) = result?;
    let status = if replaced { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(describe(&name, &manifest))))
}

fn store(state: &Shared, name: &str, archive: &[u8]) -> Result<(bool, std::sync::Arc<AdapterManifest>), ApiError> {
    let root = &state.adapter_store;
    std::fs::create_dir_all(root).map_err(|e| ApiError::internal(format!("{}: {e}", root.display())))?;
    let tmp: PathBuf = root.join(format!(".upload-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&tmp).map_err(|e| ApiError::internal(format!("{}: {e}", tmp.display())))?;
    let cleanup = |e: ApiError| {
        let _ = std::fs::remove_dir_all(&tmp);
        e
    };
    unpack(archive, &tmp).map_err(cleanup)?;
    // Validate before anything is renamed or registered: a bad upload changes nothing.
    AdapterManifest::inspect(&tmp, state.engine.model().llama.config())
        .map_err(|e| cleanup(ApiError { code: "invalid_adapter", ..ApiError::from(e) }))?;
    let dir = root.join(format!("{name}@{:016x}", rand::random::<u64>()));
    std::fs::rename(&tmp, &dir).map_err(|e| cleanup(ApiError::internal(format!("{}: {e}", dir.display()))))?;
    let pager = state.engine.pager();
    let replaced = pager.manifest(name).is_some();
    if let Err(e) = pager.register(name, &dir) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(ApiError { code: "invalid_adapter", ..ApiError::from(e) });
    }
    let manifest = pager.manifest(name).ok_or_else(|| ApiError::internal("adapter vanished after registration"))?;
    Ok((replaced, manifest))
}
