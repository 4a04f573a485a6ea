//! Turning an engine request stream into OpenAI responses: one JSON body, or SSE chunks.

use std::convert::Infallible;
use std::time::Instant;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::{Value, json};
use tokio::sync::OwnedSemaphorePermit;

use super::{ApiError, Shared};
use crate::engine::{Ended, Event, FinishReason, TokenLogprob, Usage};
use crate::settlement::Metered;

/// Which API shape to answer in.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// `/v1/completions`.
    Completion {
        /// Whether `logprobs` was asked for.
        logprobs: bool,
    },
    /// `/v1/chat/completions`.
    Chat {
        /// Whether `logprobs` was asked for.
        logprobs: bool,
    },
}

impl Kind {
    /// Prefix of response ids.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Kind::Completion { .. } => "cmpl",
            Kind::Chat { .. } => "chatcmpl",
        }
    }
}

/// Fields every response of one request carries.
pub struct Reply {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub kind: Kind,
    pub include_usage: bool,
}

/// One token as the logprobs fields present it.
struct TokenInfo {
    text: String,
    logprob: Option<TokenLogprob>,
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

fn logprobs_json(kind: Kind, tokens: &[TokenInfo], text_offset0: usize) -> Value {
    match kind {
        Kind::Completion { logprobs: false } | Kind::Chat { logprobs: false } => Value::Null,
        Kind::Completion { logprobs: true } => {
            let mut offset = text_offset0;
            let mut offsets = Vec::new();
            for t in tokens {
                offsets.push(offset);
                offset += t.text.len();
            }
            json!({
                "tokens": tokens.iter().map(|t| t.text.clone()).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob.as_ref().map(|l| l.logprob)).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|t| {
                    t.logprob.as_ref().map(|l| l.top.iter().map(|(_, s, p)| (s.clone(), json!(p))).collect::<serde_json::Map<_, _>>())
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
        Kind::Chat { logprobs: true } => json!({
            "content": tokens.iter().map(|t| {
                let l = t.logprob.as_ref();
                json!({
                    "token": t.text,
                    "logprob": l.map(|l| l.logprob),
                    "bytes": t.text.as_bytes(),
                    "top_logprobs": l.map(|l| l.top.iter().map(|(_, s, p)| json!({"token": s, "logprob": p, "bytes": s.as_bytes()})).collect::<Vec<_>>()).unwrap_or_default(),
                })
            }).collect::<Vec<_>>(),
        }),
    }
}

fn token_info(state: &Shared, id: u32, logprob: Option<TokenLogprob>) -> TokenInfo {
    TokenInfo { text: state.engine.model().tokenizer.decode(&[id]).unwrap_or_default(), logprob }
}

fn observe(state: &Shared, model: &str, status: &str, start: Instant, first: Option<Instant>, last: Instant, n: u32) {
    let h = &state.metrics.http;
    h.requests.with_label_values(&[model, status]).inc();
    tracing::info!(status, completion_tokens = n, seconds = last.duration_since(start).as_secs_f64(), "request done");
    if let Some(first) = first {
        h.ttft_seconds.observe(first.duration_since(start).as_secs_f64());
        if n > 1 {
            h.tpot_seconds.observe(last.duration_since(first).as_secs_f64() / f64::from(n - 1));
        }
    }
}

/// Records a request the engine failed (if it did work) and returns the client's error: the
/// ledger's, if recording failed, else the generation failure.
async fn failed(stream: &mut Metered, message: String, usage: &Usage) -> ApiError {
    match stream.finish(Ended::Failed(message.clone()), usage).await {
        Err(e) => e.into(),
        // The engine's text may name server files (an adapter that failed to load): logged only.
        Ok(_) => ApiError::hidden(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "generation_failed",
            "the request failed while it was being served",
            message,
        ),
    }
}

/// The outcome of a non-streamed request.
pub enum Collected {
    /// The response body.
    Done(Value),
    /// The request failed after it was accepted.
    Failed(ApiError),
}

/// Waits for the whole completion and builds the response body.
pub async fn collect(state: &Shared, mut stream: Metered, reply: &Reply) -> Collected {
    let start = Instant::now();
    let mut first = None;
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Event::Token { id, text: piece, logprob } => {
                first.get_or_insert_with(Instant::now);
                text.push_str(&piece);
                if id != u32::MAX {
                    tokens.push(token_info(state, id, logprob));
                }
            }
            Event::Done { reason, usage } => {
                // The entry is durably written before the client sees its usage.
                let billing = match stream.finish(Ended::Finished(reason), &usage).await.map_err(ApiError::from) {
                    Ok(b) => b.unwrap_or(Value::Null),
                    Err(e) => {
                        observe(state, &reply.model, e.code, start, first, Instant::now(), 0);
                        return Collected::Failed(e);
                    }
                };
                observe(state, &reply.model, "ok", start, first, Instant::now(), usage.completion_tokens);
                let logprobs = logprobs_json(reply.kind, &tokens, 0);
                let choice = match reply.kind {
                    Kind::Completion { .. } => json!({
                        "index": 0, "text": text, "logprobs": logprobs, "finish_reason": FinishReason::openai(reason),
                    }),
                    Kind::Chat { .. } => json!({
                        "index": 0, "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs, "finish_reason": FinishReason::openai(reason),
                    }),
                };
                let object = match reply.kind {
                    Kind::Completion { .. } => "text_completion",
                    Kind::Chat { .. } => "chat.completion",
                };
                return Collected::Done(json!({
                    "id": reply.id, "object": object, "created": reply.created, "model": reply.model,
                    "choices": [choice], "usage": usage_json(&usage), "billing": billing,
                }));
            }
            Event::Failed { message, usage } => {
                let e = failed(&mut stream, message, &usage).await;
                observe(state, &reply.model, e.code, start, first, Instant::now(), 0);
                return Collected::Failed(e);
            }
        }
    }
    Collected::Failed(ApiError::internal("the engine dropped the request"))
}

fn chunk(reply: &Reply, choice: Value) -> Value {
    let object = match reply.kind {
        Kind::Completion { .. } => "text_completion",
        Kind::Chat { .. } => "chat.completion.chunk",
    };
    let mut c =
        json!({"id": reply.id, "object": object, "created": reply.created, "model": reply.model, "choices": [choice]});
    if reply.include_usage {
        c["usage"] = Value::Null;
    }
    c
}

fn delta_choice(kind: Kind, text: &str, logprobs: Value, finish: Option<&str>, first: bool) -> Value {
    match kind {
        Kind::Completion { .. } => json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}),
        Kind::Chat { .. } => {
            let delta = if first { json!({"role": "assistant", "content": text}) } else { json!({"content": text}) };
            json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        }
    }
}

struct SseState {
    state: Shared,
    stream: Metered,
    done: bool,
    reply: Reply,
    pending: std::collections::VecDeque<SseEvent>,
    start: Instant,
    first: Option<Instant>,
    sent_any: bool,
    text_offset: usize,
    _permit: OwnedSemaphorePermit,
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// The request as server-sent events, ending with `data: [DONE]`. If the client goes away the
/// stream is dropped, which cancels the request in the engine (and records what it used).
pub fn sse(
    state: Shared,
    stream: Metered,
    reply: Reply,
    permit: OwnedSemaphorePermit,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let st = SseState {
        state,
        stream,
        done: false,
        reply,
        pending: Default::default(),
        start: Instant::now(),
        first: None,
        sent_any: false,
        text_offset: 0,
        _permit: permit,
    };
    // The stream is polled outside the handler: carry the request's span into each poll.
    let span = tracing::Span::current();
    let events = futures_util::stream::unfold(st, move |mut st| {
        tracing::Instrument::instrument(
            async move {
                loop {
                    if let Some(ev) = st.pending.pop_front() {
                        return Some((Ok(ev), st));
                    }
                    if st.done {
                        return None;
                    }
                    let Some(ev) = st.stream.next().await else {
                        st.done = true;
                        continue;
                    };
                    match ev {
                        Event::Token { id, text, logprob } => {
                            st.first.get_or_insert_with(Instant::now);
                            let infos: Vec<TokenInfo> =
                                if id == u32::MAX { Vec::new() } else { vec![token_info(&st.state, id, logprob)] };
                            if text.is_empty() && infos.is_empty() {
                                continue;
                            }
                            let lp = logprobs_json(st.reply.kind, &infos, st.text_offset);
                            st.text_offset += text.len();
                            let first = !st.sent_any;
                            st.sent_any = true;
                            st.pending.push_back(data(&chunk(
                                &st.reply,
                                delta_choice(st.reply.kind, &text, lp, None, first),
                            )));
                        }
                        Event::Done { reason, usage } => {
                            st.done = true;
                            // The entry is durably written before the last chunk (with the usage) is sent.
                            let billing = match st
                                .stream
                                .finish(Ended::Finished(reason), &usage)
                                .await
                                .map_err(ApiError::from)
                            {
                                Ok(b) => b.unwrap_or(Value::Null),
                                Err(e) => {
                                    observe(&st.state, &st.reply.model, e.code, st.start, st.first, Instant::now(), 0);
                                    st.pending.push_back(data(&e.body()));
                                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                                    continue;
                                }
                            };
                            observe(
                                &st.state,
                                &st.reply.model,
                                "ok",
                                st.start,
                                st.first,
                                Instant::now(),
                                usage.completion_tokens,
                            );
                            let first = !st.sent_any;
                            let fin =
                                delta_choice(st.reply.kind, "", Value::Null, Some(FinishReason::openai(reason)), first);
                            let mut fin = chunk(&st.reply, fin);
                            fin["billing"] = billing.clone();
                            st.pending.push_back(data(&fin));
                            if st.reply.include_usage {
                                let mut u = chunk(&st.reply, Value::Null);
                                u["choices"] = json!([]);
                                u["usage"] = usage_json(&usage);
                                u["billing"] = billing;
                                st.pending.push_back(data(&u));
                            }
                            st.pending.push_back(SseEvent::default().data("[DONE]"));
                        }
                        Event::Failed { message, usage } => {
                            st.done = true;
                            let e = failed(&mut st.stream, message, &usage).await;
                            observe(&st.state, &st.reply.model, e.code, st.start, st.first, Instant::now(), 0);
                            st.pending.push_back(data(&e.body()));
                            st.pending.push_back(SseEvent::default().data("[DONE]"));
                        }
                    }
                }
            },
            span.clone(),
        )
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
