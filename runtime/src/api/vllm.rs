//! vLLM's model-server protocol, beside our own API, for the Kubernetes inference gateways that
//! drive replicas as if they were vLLM (llm-d's endpoint picker, AIBrix, KServe, the production
//! stack): `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`, with vLLM's exact
//! answers, behind the admin gate (the operator; an owner for its own adapters). A `lora_path`
//! must lie under one of the config's `lora_path_roots` (an owner's: under `<root>/<owner>/`);
//! the adapter's configuration and weights are copied into the adapter store and go through the
//! same validation, quotas, audit trail and publication to the other replicas as an upload.

use std::path::{Path, PathBuf};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::admin::{begin_upload, finish_upload, remove_adapter, valid_name};
use super::caller::owns;
use super::{ApiError, JsonBody, Shared, blocking};
use crate::accounts::Caller;

/// The protocol's routes (merged under the admin gate).
pub fn router() -> Router<Shared> {
    Router::new().route("/v1/load_lora_adapter", post(load)).route("/v1/unload_lora_adapter", post(unload))
}

/// Every metric as `/metrics` answers it: vLLM's gauges set from the engine's and the pager's
/// latest state, then both registries rendered — one scrape at a time, so a label set one
/// scrape resets is never seen half built by another.
pub fn render_metrics(state: &super::AppState) -> String {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    set_gauges(state);
    state.metrics.render()
}

fn set_gauges(state: &super::AppState) {
    let (m, stats, pager) = (&state.metrics.vllm, state.engine.stats(), state.engine.pager());
    m.waiting.set(stats.waiting as i64);
    m.running.set(stats.running as i64);
    let used = stats.kv_total_blocks.saturating_sub(stats.kv_free_blocks);
    let usage = if stats.kv_total_blocks > 0 { used as f64 / stats.kv_total_blocks as f64 } else { 0.0 };
    m.kv_usage.set(usage);
    m.gpu_cache_usage.set(usage);
    m.cache_config.reset();
    let blocks = stats.kv_total_blocks.to_string();
    m.cache_config.with_label_values(&[&crate::model::BLOCK_SIZE.to_string(), &blocks]).set(1.0);
    let capacity = pager.active_capacity();
    m.max_gpu.set(capacity as i64);
    m.lora_requests_info.reset();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let (running, waiting) = (stats.running_adapters.join(","), stats.waiting_adapters.join(","));
    m.lora_requests_info.with_label_values(&[&capacity.to_string(), &running, &waiting]).set(now);
    let (active, _) = pager.active_snapshot();
    let host = pager.host_snapshot();
    m.lora_loaded.reset();
    for (name, pins) in &active {
        let pinned = if *pins > 0 { "true" } else { "false" };
        m.lora_loaded.with_label_values(&[name.as_str(), "gpu", pinned]).set(1.0);
    }
    for name in &host {
        m.lora_loaded.with_label_values(&[name.as_str(), "cpu", "false"]).set(1.0);
    }
    m.gpu_loaded.set(active.len() as i64);
    m.cpu_loaded.set(host.len() as i64);
}

/// `POST /v1/load_lora_adapter`'s body, as vLLM takes it.
#[derive(Debug, Deserialize)]
struct LoadRequest {
    lora_name: String,
    lora_path: String,
    /// Replace an adapter already loaded under the name.
    #[serde(default)]
    load_inplace: bool,
    /// The base the adapter is for; when given it must be this server's.
    #[serde(default)]
    base_model_name: Option<String>,
}

/// `POST /v1/unload_lora_adapter`'s body.
#[derive(Debug, Deserialize)]
struct UnloadRequest {
    lora_name: String,
    /// vLLM accepts an id too; the name decides here.
    #[serde(default)]
    #[allow(dead_code)]
    lora_int_id: Option<u64>,
}

/// An error as vLLM answers it: `{"error": {"message", "type", "param": null, "code": <status>}}`.
fn vllm_error(status: StatusCode, kind: &str, message: String) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}});
    (status, Json(body)).into_response()
}

/// vLLM's plain-text success.
fn success(text: String) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

async fn load(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<LoadRequest>,
) -> Result<Response, ApiError> {
    let name = req.lora_name;
    valid_name(&state, &name)?;
    if let Some(base) = req.base_model_name.as_deref()
        && base != state.model_name
    {
        let message = format!("base_model_name `{base}` is not this server's base model `{}`", state.model_name);
        return Ok(vllm_error(StatusCode::BAD_REQUEST, "InvalidUserInput", message));
    }
    if state.engine.pager().manifest(&name).is_some() && !req.load_inplace {
        let message = format!(
            "The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, set \
             'load_inplace' to True."
        );
        return Ok(vllm_error(StatusCode::BAD_REQUEST, "InvalidUserInput", message));
    }
    // An owner reads only its own folder under each root (`<root>/<owner>/...`), so one owner
    // cannot load another's files.
    let roots: Vec<PathBuf> = match &caller {
        Caller::Owner { name: me, .. } => state.config.lora_path_roots.iter().map(|r| r.join(me)).collect(),
        _ => state.config.lora_path_roots.clone(),
    };
    let folder = allowed_folder(&roots, &req.lora_path)?;
    let _one = state.owner_lock(&caller).await;
    let mut owner = None;
    let quotas = begin_upload(&state, &caller, &name, &mut owner).await?;
    let stage = state.adapter_store.stage().map_err(|e| ApiError::internal(e.to_string()))?;
    let (to, limit) = (stage.clone(), state.config.limits.max_upload_bytes as u64);
    if let Err(e) = blocking("copy adapter", move || copy_folder(&folder, &to, limit)).await {
        let _ = std::fs::remove_dir_all(&stage);
        return Err(e);
    }
    finish_upload(&state, &caller, &name, (&stage, owner), quotas, "adapter.load").await?;
    Ok(success(format!("Success: LoRA adapter '{name}' added successfully.")))
}

async fn unload(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<UnloadRequest>,
) -> Result<Response, ApiError> {
    let name = req.lora_name;
    let not_found =
        || vllm_error(StatusCode::NOT_FOUND, "NotFoundError", format!("The lora adapter '{name}' cannot be found."));
    // An owner unloads only its own adapters; another's looks like none.
    if let Caller::Owner { name: me, .. } = &caller
        && owns(&state, me, &name) != Some(true)
    {
        return Ok(not_found());
    }
    if !remove_adapter(&state, &caller, &name).await? {
        return Ok(not_found());
    }
    Ok(success(format!("Success: LoRA adapter '{name}' removed successfully.")))
}

/// The folder `lora_path` names, once it is shown to lie under one of `roots` (symbolic links
/// resolved first, so none leads out). Errors never say what the server's disk holds.
fn allowed_folder(roots: &[PathBuf], lora_path: &str) -> Result<PathBuf, ApiError> {
    let refused = |m: &str| ApiError::invalid(Some("lora_path".into()), m.to_string());
    if roots.is_empty() {
        return Err(refused(
            "loading adapters by path is turned off on this server: its config lists no lora_path_roots",
        ));
    }
    let outside = "lora_path must be an existing folder under one of the server's lora_path_roots";
    let path = Path::new(lora_path);
    if lora_path.is_empty() || !path.is_absolute() {
        return Err(refused("lora_path must be an absolute path"));
    }
    let folder = std::fs::canonicalize(path).map_err(|_| refused(outside))?;
    let inside = roots.iter().filter_map(|r| std::fs::canonicalize(r).ok()).any(|r| folder.starts_with(&r));
    if !inside || !folder.is_dir() {
        return Err(refused(outside));
    }
    Ok(folder)
}

/// Copies the adapter's configuration and weights from `folder` into `stage`, at most `limit`
/// bytes in all. Each file is opened without following a link and without blocking (a FIFO
/// fails), checked to be a regular file on the open handle, and read through a cap, so nothing
/// swapped in after the checks is copied. An owner file there is not copied: who owns the
/// adapter is the caller's to say, never the folder's.
fn copy_folder(folder: &Path, stage: &Path, limit: u64) -> Result<(), ApiError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let refused = |m: String| ApiError::invalid(Some("lora_path".into()), m);
    let unreadable = |_| refused("the folder at lora_path cannot be read".into());
    let mut total = 0u64;
    for file in [crate::adapters::CONFIG_FILE, crate::adapters::WEIGHTS_FILE] {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(folder.join(file));
        let mut from = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => return Err(refused(format!("`{file}` in lora_path is not a regular file that can be read"))),
        };
        if !from.metadata().map_err(unreadable)?.is_file() {
            return Err(refused(format!("`{file}` in lora_path is not a regular file")));
        }
        let mut to = std::fs::File::create(stage.join(file)).map_err(|e| ApiError::internal(e.to_string()))?;
        let left = limit - total;
        let copied = std::io::copy(&mut (&mut from).take(left + 1), &mut to).map_err(unreadable)?;
        if copied > left {
            let message = format!("the adapter's files are over the upload limit of {limit} bytes");
            return Err(ApiError { status: StatusCode::PAYLOAD_TOO_LARGE, ..refused(message) });
        }
        total += copied;
    }
    Ok(())
}
