//! `/v1/completions`, `/v1/chat/completions` and `/v1/models`, as OpenAI defines them.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::stream::{Collected, Kind, Reply, collect, sse};
use super::{ApiError, JsonBody, Permit, Shared, blocking, parse};
use crate::request::chat::ChatMessage;
use crate::request::{ApiParams, Prepared, PromptInput, Validator, idempotency_key};
use crate::settlement::Admission;

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// How the response is delivered (fields both endpoints share).
#[derive(Debug, Default, Deserialize)]
pub struct Delivery {
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

/// `POST /v1/completions` body.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    model: String,
    prompt: PromptInput,
    logprobs: Option<u32>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

/// Admits a validated request through settlement and answers it, streamed or whole.
async fn answer(
    state: Shared,
    prepared: Prepared,
    kind: Kind,
    delivery: Delivery,
    (tenant, headers): (String, &HeaderMap),
    label: String,
    permit: OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    let idempotency_key = idempotency_key(headers.get("idempotency-key").map(|v| v.as_bytes()))?;
    let admission = Admission { prepared, tenant, requested_model: label.clone(), idempotency_key };
    let stream = state.settlement.admit(admission).await?;
    let reply = Reply {
        id: request_id(kind.id_prefix()),
        created: unix_now(),
        model: label,
        kind,
        include_usage: delivery.stream_options.as_ref().is_some_and(|o| o.include_usage),
    };
    if delivery.stream.unwrap_or(false) {
        Ok(sse(state, stream, reply, permit).into_response())
    } else {
        Ok(match collect(&state, stream, &reply).await {
            Collected::Done(body) => Json(body).into_response(),
            Collected::Failed(e) => e.into_response(),
        })
    }
}

/// Which endpoint a request came to.
#[derive(Clone, Copy)]
enum Endpoint {
    Completion,
    Chat,
}

/// A request's validation, to run on a blocking thread.
type Prepare = Box<dyn FnOnce(&Validator) -> crate::Result<Prepared> + Send>;

/// One request to either endpoint: the permit first, then the tenant, the body's fields, the
/// validation (off the async threads), settlement and the answer, all in the request's span.
async fn respond(
    state: Shared,
    (headers, permit): (HeaderMap, Permit),
    raw: Value,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let id = request_id("req");
    let label = raw.get("model").and_then(Value::as_str).unwrap_or_default().to_string();
    let span = tracing::info_span!("request", id = %id, model = %label);
    let (st, model) = (state.clone(), label.clone());
    let prompt_param = match endpoint {
        Endpoint::Completion => "prompt",
        Endpoint::Chat => "messages",
    };
    let answered = async move {
        let tenant = permit.tenant.clone();
        let permit = permit.take().ok_or_else(|| ApiError::internal("the request's permit was taken twice"))?;
        let params: ApiParams = parse(&raw)?;
        let delivery: Delivery = parse(&raw)?;
        let (kind, prepare): (Kind, Prepare) = match endpoint {
            Endpoint::Completion => {
                let body: CompletionRequest = parse(&raw)?;
                let kind = Kind::Completion { logprobs: body.logprobs.is_some() };
                (kind, Box::new(move |v| v.completion(id, &body.model, &body.prompt, body.logprobs, params)))
            }
            Endpoint::Chat => {
                let body: ChatRequest = parse(&raw)?;
                let kind = Kind::Chat { logprobs: body.logprobs.unwrap_or(false) };
                let logprobs = (body.logprobs, body.top_logprobs);
                (kind, Box::new(move |v| v.chat(id, &body.model, &body.messages, logprobs, params)))
            }
        };
        let st = state.clone();
        let prepared = blocking("validation", move || Ok(prepare(&st.validator)?)).await?;
        answer(state, prepared, kind, delivery, (tenant, &headers), label, permit).await
    }
    .instrument(span)
    .await
    .map_err(|mut e| {
        // The prompt is `prompt` on one endpoint and `messages` on the other.
        if e.code == "context_length_exceeded" && e.param.is_some() {
            e.param = Some(prompt_param.into());
        }
        e
    });
    // Every refusal counted, whichever step refused (answers are counted when they end).
    if let Err(e) = &answered {
        st.metrics.http.requests.with_label_values(&[&model, e.code]).inc();
    }
    answered
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Shared>,
    Extension(permit): Extension<Permit>,
    headers: HeaderMap,
    JsonBody(raw): JsonBody<Value>,
) -> Result<Response, ApiError> {
    respond(state, (headers, permit), raw, Endpoint::Completion).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Shared>,
    Extension(permit): Extension<Permit>,
    headers: HeaderMap,
    JsonBody(raw): JsonBody<Value>,
) -> Result<Response, ApiError> {
    respond(state, (headers, permit), raw, Endpoint::Chat).await
}

/// `GET /v1/models`: the base model and every adapter.
pub async fn models(
    State(state): State<Shared>,
    Extension(permit): Extension<Permit>,
) -> Result<Json<Value>, ApiError> {
    let tenant = permit.tenant.clone();
    let st = state.clone();
    // The adapters the router would serve this tenant with (its allow-list), asked off the
    // async threads: a router plugin is called once per adapter.
    let names = blocking("models", move || {
        let now = crate::ledger::now_ms();
        let names = st.engine.pager().names();
        Ok(names.into_iter().filter(|n| st.policy.would_serve(&tenant, n, now)).collect::<Vec<_>>())
    })
    .await?;
    let mut data = vec![json!({
        "id": state.model_name, "object": "model", "created": state.started, "owned_by": "openlora",
        "root": state.model_name, "parent": null,
    })];
    for name in names {
        data.push(json!({
            "id": name, "object": "model", "created": state.started, "owned_by": "openlora",
            "root": name, "parent": state.model_name,
        }));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}
