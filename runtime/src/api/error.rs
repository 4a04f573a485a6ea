//! Errors in OpenAI's JSON shape, with the HTTP status each deserves.

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::{AccountError, Error, LedgerError, LoadError, PolicyError, SubmitError};
use crate::settlement::SettleError;

/// An error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI error type (`invalid_request_error`, …).
    pub kind: &'static str,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// A stable machine-readable code; also the `status` label of request metrics.
    pub code: &'static str,
    /// Seconds to wait before retrying (429 / 503).
    pub retry_after: Option<u64>,
    /// More fields of the error object (e.g. the `billing` of the request a 409 refers to).
    pub extra: Option<Box<serde_json::Map<String, serde_json::Value>>>,
}

impl ApiError {
    /// 400 for a bad field.
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into(),
            code: "invalid_request",
            retry_after: None,
            extra: None,
        }
    }

    /// Any status with a code.
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code, retry_after: None, extra: None }
    }

    /// An axum extractor's rejection (path, query, …) in our shape: 400s stay 400s, with its text.
    pub fn rejected(status: StatusCode, message: impl Into<String>) -> Self {
        if status.is_server_error() {
            Self::internal(message)
        } else {
            ApiError { status, ..Self::invalid(None, message) }
        }
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", "invalid_api_key", message)
    }

    /// 403: the caller's key does not allow this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", "forbidden", message)
    }

    /// 404 for a model or adapter.
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            param: Some("model".into()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("The model `{model}` does not exist"),
            )
        }
    }

    /// 429 with a `Retry-After`.
    pub fn overloaded(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "rate_limit_exceeded", message)
        }
    }

    /// 500 for a fault of ours (never for bad input). The details (which may name server paths)
    /// are logged with the request's id, not sent.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::hidden(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "an internal error occurred", detail)
    }

    /// A server-side failure answered with `public` alone; `detail` goes to the log (in the
    /// request's span, so with its id).
    pub fn hidden(status: StatusCode, code: &'static str, public: &str, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        tracing::error!(status = status.as_u16(), code, detail = detail.as_str(), "request failed on the server");
        Self::new(status, "server_error", code, format!("{public}; the server's log has the details"))
    }

    /// The error object alone, for streamed errors.
    pub fn body(&self) -> serde_json::Value {
        let mut e = json!({"message": self.message, "type": self.kind, "param": self.param, "code": self.code});
        for (k, v) in self.extra.iter().flat_map(|m| m.iter()) {
            e[k] = v.clone();
        }
        json!({ "error": e })
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::Submit(e) => submit_error(e, msg),
            Error::Policy(e) => match e {
                PolicyError::PluginInvalid { .. } => {
                    ApiError { code: "invalid_plugin", ..ApiError::invalid(None, msg) }
                }
                PolicyError::UnknownPlugin(_) => {
                    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", msg)
                }
                PolicyError::InUse(_) => {
                    ApiError::new(StatusCode::CONFLICT, "invalid_request_error", "plugin_in_use", msg)
                }
                PolicyError::Rejected(_) => {
                    ApiError::new(StatusCode::FORBIDDEN, "permission_error", "rejected_by_policy", msg)
                }
                PolicyError::Failed { .. } => {
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "policy_unavailable", msg)
                }
                PolicyError::Runtime { .. } => ApiError::internal(msg),
            },
            Error::Account(e) => account_error(e, msg),
            Error::Ledger(LedgerError::Refused(_)) => ApiError::internal(msg),
            Error::Ledger(_) => ApiError {
                retry_after: Some(1),
                ..ApiError::hidden(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ledger_unavailable",
                    "the ledger is unavailable",
                    msg,
                )
            },
            Error::Config { .. }
            | Error::Load(
                LoadError::MissingFile { .. }
                | LoadError::MissingTensor { .. }
                | LoadError::TensorShape { .. }
                | LoadError::WeightFile { .. },
            ) => ApiError { code: "invalid_adapter", ..ApiError::invalid(None, msg) },
            Error::Io { .. } | Error::Tensor(_) | Error::Device(_) => ApiError::internal(msg),
        }
    }
}

impl From<SettleError> for ApiError {
    fn from(e: SettleError) -> Self {
        let msg = e.to_string();
        match e {
            SettleError::KeyInUse => {
                ApiError::new(StatusCode::CONFLICT, "invalid_request_error", "idempotency_key_in_use", msg)
            }
            SettleError::KeyReused { billing } => ApiError {
                extra: Some(Box::new([("billing".to_string(), *billing)].into_iter().collect())),
                ..ApiError::new(StatusCode::CONFLICT, "invalid_request_error", "idempotency_key_reused", msg)
            },
            SettleError::Failed(e) => e.into(),
            SettleError::Panicked(_) => ApiError::internal(msg),
        }
    }
}

/// The client's error for an account, key, quota or audit failure.
fn account_error(e: AccountError, msg: String) -> ApiError {
    match e {
        AccountError::Invalid { param, .. } => ApiError::invalid(Some(param.to_string()), msg),
        AccountError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", msg),
        AccountError::Forbidden(_) => ApiError::forbidden(msg),
        AccountError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "invalid_request_error", "name_taken", msg),
        AccountError::Changed(_) => ApiError::new(StatusCode::CONFLICT, "invalid_request_error", "conflict", msg),
        AccountError::Quota { size: true, .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "quota_exceeded", msg)
        }
        AccountError::Quota { retry_after, .. } => ApiError {
            retry_after,
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "quota_exceeded", msg)
        },
        AccountError::Store { .. } | AccountError::Tampered(_) => ApiError {
            retry_after: Some(1),
            ..ApiError::hidden(StatusCode::SERVICE_UNAVAILABLE, "accounts_unavailable", "accounts are unavailable", msg)
        },
    }
}

/// The client's error for a request the engine refused or could not serve.
fn submit_error(e: SubmitError, msg: String) -> ApiError {
    match e {
        SubmitError::InvalidParam { param, .. } => ApiError::invalid(Some(param.to_string()), msg),
        SubmitError::InvalidField { param, .. } => ApiError::invalid(param, msg),
        SubmitError::PromptTooLong { .. } => {
            ApiError { code: "context_length_exceeded", ..ApiError::invalid(Some("prompt".to_string()), msg) }
        }
        SubmitError::Tokenize(_) => ApiError::invalid(None, msg),
        SubmitError::ContextOverflow { .. } => {
            ApiError { code: "context_length_exceeded", ..ApiError::invalid(Some("messages".to_string()), msg) }
        }
        SubmitError::KvExhausted { .. } => ApiError { code: "context_length_exceeded", ..ApiError::invalid(None, msg) },
        SubmitError::UnknownAdapter(name) => ApiError::model_not_found(&name),
        SubmitError::QueueFull => ApiError::overloaded(msg),
        SubmitError::EngineStopped => ApiError {
            retry_after: Some(5),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "unavailable", msg)
        },
        SubmitError::AdapterLoad { name, .. } => ApiError::hidden(
            StatusCode::SERVICE_UNAVAILABLE,
            "adapter_unavailable",
            &format!("adapter `{name}` could not be loaded"),
            msg,
        ),
        SubmitError::AdapterTooLarge { .. } | SubmitError::PoolTimeout(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "adapter_unavailable", msg)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.status == StatusCode::CONFLICT {
            // OpenAI's clients retry 409s unless told not to; a repeated request key never succeeds.
            resp.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
        resp
    }
}

/// Path parameters (like axum's `Path`) whose rejection is an [`ApiError`], not plain text.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| ApiPath(t))
            .map_err(|r| ApiError::rejected(r.status(), r.body_text()))
    }
}

/// A query string (like axum's `Query`) whose rejection is an [`ApiError`], not plain text.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(t)| ApiQuery(t))
            .map_err(|r| ApiError::rejected(r.status(), r.body_text()))
    }
}
