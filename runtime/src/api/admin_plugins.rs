//! `/admin/plugins`: upload (validated before anything changes), list, activate, roll back and
//! deactivate policy plugins, slot by slot (behind the admin layer of [`super::router`]).

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiPath, ApiQuery, Shared, blocking, is_multipart, multipart_error, upload_error};
use crate::error::{Error, PolicyError};
use crate::policy::Slot;

/// Plugin admin routes.
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/admin/plugins", get(list))
        .route("/admin/plugins/{slot}", get(show).post(upload).put(upload).delete(deactivate))
        .route("/admin/plugins/{slot}/rollback", post(rollback))
        .route("/admin/plugins/{slot}/activate/{version}", post(activate))
        .route("/admin/plugins/{slot}/versions/{version}", delete(remove_version))
}

fn slot(name: &str) -> Result<Slot, ApiError> {
    name.parse().map_err(|m: String| ApiError::invalid(Some("slot".into()), m))
}

fn bad_upload(m: String) -> ApiError {
    ApiError { code: "invalid_plugin", ..ApiError::invalid(Some("body".into()), m) }
}

async fn list(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"object": "list", "data": state.policy.list()})))
}

async fn show(State(state): State<Shared>, ApiPath(name): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let slot = slot(&name)?;
    let view = state.policy.list().into_iter().find(|v| v.slot == slot);
    let view = view.ok_or_else(|| ApiError::from(Error::from(PolicyError::UnknownPlugin(format!("slot {slot}")))))?;
    Ok(Json(json!(view)))
}

/// `?config=` of a raw upload.
#[derive(Debug, Deserialize)]
struct UploadQuery {
    config: Option<String>,
}

/// `POST|PUT /admin/plugins/{slot}`: the component as the raw body (config in `?config=`), or a
/// multipart form with a `plugin` file part and an optional `config` part (JSON).
async fn upload(
    State(state): State<Shared>,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    req: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let slot = slot(&name)?;
    let (bytes, config) = if is_multipart(&headers) {
        let mut form =
            Multipart::from_request(req, &state).await.map_err(|r| upload_error(r.status(), r.body_text()))?;
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
        let body = Bytes::from_request(req, &state).await.map_err(|r| upload_error(r.status(), r.body_text()))?;
        (body.to_vec(), query.config)
    };
    let config = config.unwrap_or_default();
    if !config.trim().is_empty() && serde_json::from_str::<Value>(&config).is_err() {
        return Err(ApiError::invalid(Some("config".into()), "the plugin config must be JSON"));
    }
    let (st, slot2) = (state.clone(), slot.clone());
    let info = blocking("upload", move || Ok(st.policy.install(&slot2, &bytes, &config, "admin")?)).await?;
    Ok((StatusCode::CREATED, Json(json!({"slot": slot, "active": info}))))
}

async fn rollback(State(state): State<Shared>, ApiPath(name): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let slot = slot(&name)?;
    let (st, slot2) = (state.clone(), slot.clone());
    let active = blocking("rollback", move || Ok(st.policy.rollback(&slot2)?)).await?;
    Ok(Json(json!({"slot": slot, "active": active})))
}

async fn activate(
    State(state): State<Shared>,
    ApiPath((name, version)): ApiPath<(String, u32)>,
) -> Result<Json<Value>, ApiError> {
    let slot = slot(&name)?;
    let (st, slot2) = (state.clone(), slot.clone());
    let active = blocking("activate", move || Ok(st.policy.activate(&slot2, version)?)).await?;
    Ok(Json(json!({"slot": slot, "active": active})))
}

async fn remove_version(
    State(state): State<Shared>,
    ApiPath((name, version)): ApiPath<(String, u32)>,
) -> Result<Json<Value>, ApiError> {
    let slot = slot(&name)?;
    let (st, slot2) = (state.clone(), slot.clone());
    blocking("remove version", move || Ok(st.policy.remove_version(&slot2, version)?)).await?;
    Ok(Json(json!({"slot": slot, "removed": version})))
}

async fn deactivate(State(state): State<Shared>, ApiPath(name): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let slot = slot(&name)?;
    state.policy.deactivate(&slot)?;
    Ok(Json(json!({"slot": slot, "active": null})))
}
