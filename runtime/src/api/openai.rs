//! `/v1/completions`, `/v1/chat/completions` and `/v1/models`, as OpenAI defines them.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::billing::{self, PolicyContext};
use super::chat::ChatMessage;
use super::metered::Metered;
use super::stream::{Collected, Kind, Reply, collect, sse};
use super::{ApiError, JsonBody, Shared, parse, tenant};
use crate::engine::GenerationRequest;
use crate::sampling::SamplingParams;

/// `prompt`: a string, a list holding one string, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A batch of texts (only one is supported, as `n` = 1).
    Texts(Vec<String>),
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub struct CommonParams {
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<StopInput>,
    n: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    ignore_eos: Option<bool>,
    metadata: Option<BTreeMap<String, String>>,
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

/// Most alternatives `logprobs` / `top_logprobs` may ask for.
const MAX_TOP_LOGPROBS: u32 = 20;

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

fn sampling(state: &Shared, c: &CommonParams) -> Result<SamplingParams, ApiError> {
    if let Some(n) = c.n
        && n != 1
    {
        return Err(ApiError::invalid(Some("n".into()), "only n = 1 is supported"));
    }
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        Some(0) => return Err(ApiError::invalid(Some("max_tokens".into()), "max_tokens must be at least 1")),
        Some(m) => m as usize,
        None => state.config.limits.default_max_tokens,
    };
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::invalid(Some("top_k".into()), format!("{k} is not a valid top_k"))),
    };
    let seed = match c.seed {
        None => None,
        Some(s) if s >= 0 => Some(s as u64),
        Some(s) => return Err(ApiError::invalid(Some("seed".into()), format!("{s} is negative"))),
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(StopInput::One(s)) => vec![s.clone()],
        Some(StopInput::Many(v)) => v.clone(),
    };
    let p = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p.unwrap_or(1.0),
        top_k,
        seed,
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        max_tokens,
        stop,
        ignore_eos: c.ignore_eos.unwrap_or(false),
    };
    p.validate().map_err(ApiError::from)?;
    Ok(p)
}

fn check_logprobs(param: &str, k: Option<u32>) -> Result<Option<usize>, ApiError> {
    match k {
        Some(k) if k > MAX_TOP_LOGPROBS => {
            Err(ApiError::invalid(Some(param.into()), format!("at most {MAX_TOP_LOGPROBS} alternatives")))
        }
        other => Ok(other.map(|k| k as usize)),
    }
}

/// Routes a prepared request by policy, submits it and answers it, streamed or whole.
async fn answer(
    state: Shared,
    mut req: GenerationRequest,
    kind: Kind,
    c: &mut CommonParams,
    (tenant, headers): (&str, &HeaderMap),
    label: String,
) -> Result<Response, ApiError> {
    let metadata = billing::metadata(c.metadata.take())?;
    let (key, guard) = billing::reserve(&state, headers, tenant, &req.id).await?;
    let info = billing::request_info(&state, &req, tenant, &label, metadata);
    let (routed, policy) = billing::route(&state, info, key, guard).await?;
    req.adapter = routed.adapter;
    req.priority = routed.priority;
    Ok(submit(state, req, kind, c, label, policy).await)
}

async fn submit(
    state: Shared,
    req: GenerationRequest,
    kind: Kind,
    c: &CommonParams,
    label: String,
    policy: PolicyContext,
) -> Response {
    let Ok(permit) = state.in_flight.clone().try_acquire_owned() else {
        state.metrics.http.requests.with_label_values(&[&label, "rate_limit_exceeded"]).inc();
        return ApiError::overloaded("too many requests in flight").into_response();
    };
    let stream = match state.engine.submit(req) {
        Ok(s) => s,
        Err(e) => {
            let e = ApiError::from(e);
            state.metrics.http.requests.with_label_values(&[&label, e.code]).inc();
            return e.into_response();
        }
    };
    let reply = Reply {
        id: request_id(kind.id_prefix()),
        created: unix_now(),
        model: label,
        kind,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
    };
    let stream = Metered::new(state.clone(), stream, policy);
    if c.stream.unwrap_or(false) {
        sse(state, stream, reply, permit).into_response()
    } else {
        match collect(&state, stream, &reply).await {
            Collected::Done(body) => Json(body).into_response(),
            Collected::Failed(e) => e.into_response(),
        }
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Shared>,
    headers: HeaderMap,
    JsonBody(raw): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let tenant = tenant(&state, &headers)?;
    let body: CompletionRequest = parse(&raw)?;
    let mut common: CommonParams = parse(&raw)?;
    let params = sampling(&state, &common)?;
    let logprobs = check_logprobs("logprobs", body.logprobs)?;
    let tok = &state.engine.model().tokenizer;
    let prompt_ids = match &body.prompt {
        PromptInput::Text(t) => tok.encode(t)?,
        PromptInput::Texts(v) if v.len() == 1 => tok.encode(&v[0])?,
        PromptInput::Texts(_) => {
            return Err(ApiError::invalid(Some("prompt".into()), "exactly one prompt is supported"));
        }
        PromptInput::Tokens(ids) => ids.clone(),
    };
    let req = build(&state, prompt_ids, params, logprobs)?;
    answer(state, req, Kind::Completion { logprobs: logprobs.is_some() }, &mut common, (&tenant, &headers), body.model)
        .await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Shared>,
    headers: HeaderMap,
    JsonBody(raw): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let tenant = tenant(&state, &headers)?;
    let body: ChatRequest = parse(&raw)?;
    let mut common: CommonParams = parse(&raw)?;
    let params = sampling(&state, &common)?;
    if body.messages.is_empty() {
        return Err(ApiError::invalid(Some("messages".into()), "at least one message is required"));
    }
    let want_logprobs = body.logprobs.unwrap_or(false);
    let top = check_logprobs("top_logprobs", body.top_logprobs)?;
    if top.is_some() && !want_logprobs {
        return Err(ApiError::invalid(Some("top_logprobs".into()), "top_logprobs needs logprobs: true"));
    }
    let messages =
        body.messages.iter().enumerate().map(|(i, m)| m.to_template(i)).collect::<Result<Vec<_>, ApiError>>()?;
    let text = state.chat.render(&messages)?;
    // The template writes the special tokens itself.
    let prompt_ids = state.engine.model().tokenizer.encode_with(&text, false)?;
    let logprobs = want_logprobs.then(|| top.unwrap_or(0));
    let req = build(&state, prompt_ids, params, logprobs)?;
    answer(state, req, Kind::Chat { logprobs: want_logprobs }, &mut common, (&tenant, &headers), body.model).await
}

/// The engine request (not yet routed: no adapter, normal priority), checking the prompt's length.
fn build(
    state: &Shared,
    prompt_ids: Vec<u32>,
    params: SamplingParams,
    logprobs: Option<usize>,
) -> Result<GenerationRequest, ApiError> {
    let limit = state.config.limits.max_prompt_tokens;
    if prompt_ids.len() > limit {
        return Err(ApiError {
            code: "context_length_exceeded",
            ..ApiError::invalid(
                Some("prompt".into()),
                format!("the prompt has {} tokens; the limit is {limit}", prompt_ids.len()),
            )
        });
    }
    Ok(GenerationRequest {
        id: request_id("req"),
        prompt_ids,
        params,
        adapter: None,
        priority: 0,
        deadline: None,
        logprobs,
    })
}

/// `GET /v1/models`: the base model and every adapter.
pub async fn models(State(state): State<Shared>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    tenant(&state, &headers)?;
    let mut data = vec![json!({
        "id": state.model_name, "object": "model", "created": state.started, "owned_by": "openlora",
        "root": state.model_name, "parent": null,
    })];
    for name in state.engine.pager().names() {
        data.push(json!({
            "id": name, "object": "model", "created": state.started, "owned_by": "openlora",
            "root": name, "parent": state.model_name,
        }));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}
