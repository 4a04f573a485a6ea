//! The HTTP layer: OpenAI-compatible inference, the admin API, metrics and health.

pub mod admin;
pub mod admin_plugins;
pub mod caller;
pub mod earnings;
pub mod error;
pub mod keys;
pub mod ledger;
pub mod listen;
pub mod openai;
pub mod replicas;
mod stream;
mod upload;
pub mod vllm;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ServerConfig;
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
pub use error::{ApiError, ApiPath, ApiQuery};

/// What every handler shares.
pub struct AppState {
    /// The engine (and through it the model and the adapter pager).
    pub engine: EngineHandle,
    /// The server's configuration.
    pub config: ServerConfig,
    /// Name the base model is served under.
    pub model_name: String,
    /// Every metric.
    pub metrics: Metrics,
    /// Requests in flight, bounded by `limits.max_concurrent_requests`.
    pub in_flight: Arc<Semaphore>,
    /// False while starting and once shutdown has begun.
    pub ready: AtomicBool,
    /// Where uploaded adapters are stored.
    pub adapter_store: Arc<crate::adapters::store::AdapterStore>,
    /// Seconds since the epoch at start (the `created` of `/v1/models`).
    pub started: u64,
    /// Checks requests: limits, tokenizer, chat template, the engine's rules.
    pub validator: Arc<crate::request::Validator>,
    /// Admits requests and settles them (routing, pricing, attribution, the ledger).
    pub settlement: Arc<crate::settlement::SettlementService>,
    /// Routing, pricing and attribution: the plugins and the built-ins.
    pub policy: Arc<crate::policy::PolicyHost>,
    /// The folder watched for dropped-in plugins.
    pub drop_dir: std::path::PathBuf,
    /// The attribution ledger.
    pub ledger: Arc<crate::ledger::Ledger>,
    /// Owners, keys, quotas and the audit trail.
    pub accounts: Arc<crate::accounts::Accounts>,
    /// The replayer `explain` uses (made on first use; it keeps each plugin compiled).
    pub replayer: std::sync::Mutex<Option<crate::policy::Replayer>>,
    /// Third parties' reports (earnings, `explain`, dry-runs) running at once, bounded: more
    /// are 429s, so they never take every blocking thread.
    pub reports: Arc<Semaphore>,
    /// One lock per owner, held while it uploads or installs, so that its quotas are checked
    /// and its acts counted one at a time.
    pub owner_locks: dashmap::DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Sharing adapters and plugins with the other replicas (when the ledger is PostgreSQL).
    pub replication: Option<Arc<replicas::Replication>>,
}

/// Third parties' reports that may run at once.
pub const MAX_REPORTS: usize = 4;

impl AppState {
    /// Appends an act to the audit trail (off the async threads); an act that cannot be
    /// recorded is reported as failed.
    pub async fn audit(
        self: &Arc<Self>,
        by: &crate::accounts::Caller,
        action: &'static str,
        target: &str,
        sha256: Option<&str>,
        detail: String,
    ) -> Result<(), ApiError> {
        let (state, by, target, sha) = (self.clone(), by.clone(), target.to_string(), sha256.map(str::to_string));
        blocking("audit", move || {
            // The other replicas are told of the change first: one the shared rules refuse is
            // undone here and refused (nothing is recorded); one they cannot be told of is
            // reported as failed, so that a retry tells them.
            if let Some(replication) = &state.replication {
                replication.publish(&state, &by, action, &target).map_err(|e| match e {
                    e @ crate::Error::Account(_) => ApiError::from(e),
                    e => ApiError::hidden(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "replicas_not_told",
                        "the change was made here but could not be shared with the other replicas; retry it",
                        e.to_string(),
                    ),
                })?;
            }
            Ok(state.accounts.record(&by, action, &target, sha.as_deref(), &detail)?)
        })
        .await
    }

    /// Held by an administrative act from its change to its publication to the other replicas
    /// (none without replicas), so that no change read from them lands in between.
    pub async fn serial_change(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match &self.replication {
            Some(r) => Some(r.serial().await),
            None => None,
        }
    }

    /// A report's permit (429 when [`MAX_REPORTS`] are running).
    pub fn report_permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.reports
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::overloaded("too many reports are running; retry shortly"))
    }

    /// Holds an owner's lock (none for other callers) while it uploads or installs.
    pub async fn owner_lock(&self, caller: &crate::accounts::Caller) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let crate::accounts::Caller::Owner { name, .. } = caller else { return None };
        let lock = self.owner_locks.entry(name.clone()).or_default().clone();
        Some(lock.lock_owned().await)
    }
}

/// Runs `work` as a task of its own and waits for it: dropping the wait (a client that went
/// away) does not stop the work, so an administrative act is never left half done.
pub async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work).await.map_err(|e| ApiError::internal(format!("an administrative act stopped: {e}")))?
}

/// The shared state handlers receive.
pub type Shared = Arc<AppState>;

/// A JSON body whose type errors are 400s naming the field, and whose size errors are 413s,
/// both in OpenAI's error shape. Unknown fields are ignored.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(r.status(), "invalid_request_error", "request_too_large", "the request body is too large")
            } else {
                ApiError::invalid(None, r.body_text())
            }
        })?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut de).map_err(body_error)?;
        // Anything after the JSON value but whitespace makes the body invalid.
        de.end().map_err(|e| ApiError::invalid(None, format!("invalid request body: {e}")))?;
        Ok(JsonBody(value))
    }
}

fn body_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> ApiError {
    let path = e.path().to_string();
    let param = (path != "." && path != "?").then_some(path.clone());
    ApiError::invalid(param, format!("invalid request body at `{path}`: {}", e.inner()))
}

/// Reads one view of a JSON body (several structs may read the same body), naming the field
/// at fault in a 400.
pub fn parse<T: DeserializeOwned>(body: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(body_error)
}

/// Runs blocking work (disk, validation, plugin calls) off the async threads.
pub async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work))
        .await
        .map_err(|e| ApiError::internal(format!("{what} task: {e}")))?
}

/// An upload's error: 413 when it is over the size limit, else 400 (`invalid_upload`), as
/// multipart parsing and body reading report them.
pub fn upload_error(status: StatusCode, message: impl Into<String>) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(status, "invalid_request_error", "request_too_large", "the upload is too large")
    } else {
        ApiError { code: "invalid_upload", ..ApiError::invalid(Some("body".into()), message) }
    }
}

/// A multipart field's error as an upload error.
pub fn multipart_error(what: &str, e: axum::extract::multipart::MultipartError) -> ApiError {
    upload_error(e.status(), format!("{what}: {}", e.body_text()))
}

/// Whether a request's body is a multipart form.
pub fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"))
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// Compares a secret in constant time, its length included: both sides are hashed first, and
/// the digests compared byte by byte without stopping early.
pub(crate) fn secrets_match(given: &str, secret: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(given.as_bytes()), Sha256::digest(secret.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn ready(State(state): State<Shared>) -> Response {
    if let Some(fault) = state.engine.stats().device_fault {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "device_failed",
            format!("the device can run no more steps: {fault}"),
        )
        .into_response();
    }
    if state.ready.load(Ordering::Relaxed) {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "not_ready", "not ready")
        }
        .into_response()
    }
}

async fn metrics(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.config.metrics_token
        && !bearer(&headers).is_some_and(|given| secrets_match(given, token))
    {
        return ApiError::unauthorized("/metrics needs the metrics token (Authorization: Bearer ...)").into_response();
    }
    let stats = state.engine.stats();
    state.metrics.engine.kv_blocks_used.set((stats.kv_total_blocks - stats.kv_free_blocks) as i64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], vllm::render_metrics(&state)).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", "no such route")
}

/// A route that exists, asked with a method it does not take (axum adds the `Allow` header).
async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        "this route does not take that method",
    )
}

/// A completion request's concurrency permit, taken before anything of it is read, and the
/// tenant its key belongs to.
#[derive(Clone)]
pub struct Permit {
    slot: Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>,
    /// The tenant the request is made as.
    pub tenant: String,
}

impl Permit {
    /// The permit (once).
    pub fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Checks the API key, then takes a concurrency permit, before the body is read: a client
/// without a key holds nothing, and beyond `limits.max_concurrent_requests` a 429 costs the
/// server nothing more.
async fn take_permit(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    let tenant = match caller::identify(&state, req.headers()).await.and_then(|c| caller::as_tenant(&state, &c)) {
        Ok(t) => t,
        Err(e) => {
            state.metrics.http.requests.with_label_values(&["", e.code]).inc();
            return e.into_response();
        }
    };
    match state.in_flight.clone().try_acquire_owned() {
        Ok(p) => {
            // A handler that answers with a stream takes the permit along; otherwise it is held
            // until the answer is ready.
            let permit = Permit { slot: Arc::new(std::sync::Mutex::new(Some(p))), tenant };
            req.extensions_mut().insert(permit.clone());
            let response = next.run(req).await;
            drop(permit);
            response
        }
        Err(_) => {
            state.metrics.http.requests.with_label_values(&["", "rate_limit_exceeded"]).inc();
            ApiError::overloaded("too many requests in flight").into_response()
        }
    }
}

/// The whole HTTP application.
pub fn router(state: Shared) -> Router {
    let body_limit = state.config.limits.max_body_bytes;
    let upload_limit = state.config.limits.max_upload_bytes;
    let pause = std::time::Duration::from_secs(state.config.limits.body_timeout_secs as u64);
    let bodies = listen::BodyRead { limit: body_limit, pause };
    let uploads = listen::BodyRead { limit: upload_limit, pause };
    // Layers run last-added first: the permit, then the body (within its deadlines), then the handler.
    let completions = Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route_layer(middleware::from_fn_with_state(bodies, listen::read_body))
        .route_layer(middleware::from_fn_with_state(state.clone(), take_permit));
    // Listing models may ask the router once per adapter: it takes a permit like a completion.
    let models = Router::new()
        .route("/v1/models", get(openai::models))
        .route_layer(middleware::from_fn_with_state(state.clone(), take_permit));
    let v1 = Router::new()
        .merge(completions)
        .merge(models)
        .merge(ledger::router())
        .merge(earnings::router())
        .layer(DefaultBodyLimit::max(body_limit));
    // Every admin route, behind one gate: the admin token, or an owner's key for what it owns.
    // Plugin uploads and the rest are read whole (within the deadlines); adapter uploads stream
    // to disk in their handler.
    let buffered = admin_plugins::router()
        .merge(vllm::router())
        .merge(ledger::admin_router())
        .merge(keys::router())
        // Unknown admin paths too: the token is checked before anything says what exists.
        .route("/admin/{*rest}", any(not_found))
        .route_layer(middleware::from_fn_with_state(uploads, listen::read_body));
    let admin = admin::router()
        .merge(buffered)
        .route_layer(middleware::from_fn_with_state(state.clone(), caller::admin_gate))
        .layer(DefaultBodyLimit::max(upload_limit));
    Router::new()
        .merge(v1)
        .merge(admin)
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(listen::close_unless_read))
        .with_state(state)
}
