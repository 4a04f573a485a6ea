//! Who a request comes from ([`Caller`], from its `Authorization: Bearer` credential) and what
//! each scope may reach: the admin token is the operator; a TOML key is a tenant; a database
//! key (`olk_...`) is an owner, a tenant or a contributor, looked up on every request so that a
//! revoked key stops working at once on every replica. Owners reach `/admin` only for what they
//! own, checked here before any handler runs.

use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState, Shared, bearer, blocking, secrets_match};
use crate::accounts::{Caller, keys};
use crate::policy::Slot;

/// The tenant a server without API keys serves everyone as.
pub const ANONYMOUS: &str = "anonymous";

/// Resolves the caller of a request (401 for a missing, wrong, revoked or expired key).
pub async fn identify(state: &Shared, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let open = state.config.api_keys.is_empty();
    let Some(given) = bearer(headers) else {
        return if open {
            Ok(Caller::Tenant { name: ANONYMOUS.into(), key_id: None })
        } else {
            Err(ApiError::unauthorized("missing API key (Authorization: Bearer ...)"))
        };
    };
    if state.config.admin_token.as_deref().is_some_and(|t| secrets_match(given, t)) {
        return Ok(Caller::Operator);
    }
    if let Some(tenant) = state.config.api_keys.get(given) {
        return Ok(Caller::Tenant { name: tenant.clone(), key_id: None });
    }
    if given.starts_with(keys::PREFIX) {
        let (accounts, key) = (state.accounts.clone(), given.to_string());
        let found = blocking("key lookup", move || Ok(accounts.authenticate(&key)?)).await?;
        return match found {
            Some(k) => Ok(Caller::from_key(&k)),
            None => Err(ApiError::unauthorized("incorrect, revoked or expired API key")),
        };
    }
    if open {
        // Clients must send some key; on an open server any non-database key is the anonymous tenant.
        return Ok(Caller::Tenant { name: ANONYMOUS.into(), key_id: None });
    }
    Err(ApiError::unauthorized("incorrect API key provided"))
}

/// The tenant an inference or usage request is made as: a tenant key's, or anyone's on a server
/// without keys. Owner and contributor keys are not inference keys (403).
pub fn as_tenant(state: &AppState, caller: &Caller) -> Result<String, ApiError> {
    match caller {
        Caller::Tenant { name, .. } => Ok(name.clone()),
        Caller::Operator if state.config.api_keys.is_empty() => Ok(ANONYMOUS.into()),
        _ => Err(ApiError::forbidden("this key is not a tenant's key: it cannot make or read inference requests")),
    }
}

/// The layer in front of every `/admin` route: the operator passes; an owner passes only to
/// what it owns (other owners' adapters and slots are 404, the operator's routes 403); anyone
/// else is refused before any extractor reads the path, query or body. The caller is handed to
/// the handler as an extension.
pub async fn admin_gate(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    let disabled = state.config.admin_token.is_none();
    let caller = match bearer(req.headers()) {
        None if disabled => return admin_disabled().into_response(),
        None => return ApiError::unauthorized("the admin API needs the admin token or an owner's key").into_response(),
        Some(_) => match identify(&state, req.headers()).await {
            Ok(c) => c,
            Err(e) => return e.into_response(),
        },
    };
    let allowed = match &caller {
        Caller::Operator => Ok(()),
        Caller::Owner { name, .. } => {
            let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_default();
            let (mut parts, body) = req.into_parts();
            let params = RawPathParams::from_request_parts(&mut parts, &state)
                .await
                .map(|p| p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>());
            req = Request::from_parts(parts, body);
            match params {
                Ok(params) => owner_may(&state, name, req.method(), &route, &params),
                // A path it cannot read is refused, never let through.
                Err(_) => Err(ApiError::invalid(None, "the path could not be read")),
            }
        }
        // Any other token on a server without keys: not the admin token.
        Caller::Tenant { key_id: None, name } if name == ANONYMOUS && state.config.api_keys.is_empty() => {
            Err(if disabled { admin_disabled() } else { ApiError::unauthorized("invalid admin token") })
        }
        _ => Err(ApiError::forbidden("this key cannot use the admin API")),
    };
    match allowed {
        Ok(()) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

fn admin_disabled() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "permission_error",
        "admin_disabled",
        "the admin API is disabled (set admin_token in the config file)",
    )
}

/// Whether `owner` may call `route` (a matched route pattern) with these path parameters.
fn owner_may(
    state: &AppState,
    owner: &str,
    method: &Method,
    route: &str,
    params: &[(String, String)],
) -> Result<(), ApiError> {
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let owned = |adapter: &str| owns(state, owner, adapter).ok_or(());
    match route {
        "/admin/adapters" | "/admin/plugins" | "/admin/keys" | "/admin/keys/{id}" | "/admin/audit" => Ok(()),
        // The adapter is named in the body: its handler checks it is the owner's (or new).
        "/v1/load_lora_adapter" | "/v1/unload_lora_adapter" => Ok(()),
        "/admin/adapters/{name}" => {
            let name = param("name").unwrap_or_default();
            match owned(name) {
                Ok(true) => Ok(()),
                // Anyone may see the name is served (`/v1/models`); that it is not theirs is all
                // an upload learns.
                Ok(false) if *method == Method::POST || *method == Method::PUT => Err(name_taken(name)),
                Ok(false) => Err(ApiError::model_not_found(name)),
                Err(()) if *method == Method::POST || *method == Method::PUT => Ok(()),
                Err(()) => Err(ApiError::model_not_found(name)),
            }
        }
        r if r.starts_with("/admin/plugins/{slot}") => {
            let slot: Slot = param("slot")
                .unwrap_or_default()
                .parse()
                .map_err(|m: String| ApiError::invalid(Some("slot".into()), m))?;
            match slot {
                Slot::Adapter(name) => match owned(&name) {
                    Ok(true) => Ok(()),
                    _ => Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "invalid_request_error",
                        "not_found",
                        format!("no adapter `{name}` of yours"),
                    )),
                },
                _ => Err(ApiError::forbidden("an owner may only use its own adapters' `adapter:<name>` slots")),
            }
        }
        _ => Err(ApiError::forbidden("this route is the operator's")),
    }
}

/// Whether `owner` owns the adapter `name` (`None`: no such adapter).
pub fn owns(state: &AppState, owner: &str, name: &str) -> Option<bool> {
    state.engine.pager().manifest(name).map(|m| m.owner.as_deref() == Some(owner))
}

/// 409: an adapter name held by another owner (or the operator).
pub fn name_taken(name: &str) -> ApiError {
    ApiError {
        param: Some("name".into()),
        ..ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "name_taken",
            format!("the adapter name `{name}` is taken; choose another"),
        )
    }
}
