//! A request's engine stream that always ends in the ledger: read to its end, its settlement is
//! recorded by the response code ([`Metered::finish`]); dropped early (the client went away),
//! the request is cancelled and a background task waits for the engine's final usage and records
//! it, so work done for a client that left is still accounted for, exactly once.

use serde_json::Value;

use super::billing::{Ended, PolicyContext, record};
use super::{ApiError, Shared};
use crate::engine::{Event, RequestStream, Usage};

/// An engine stream with its policy context, recorded in the ledger however it ends.
pub struct Metered {
    state: Shared,
    stream: Option<RequestStream>,
    ctx: Option<PolicyContext>,
}

impl Metered {
    /// Wraps a submitted request's stream.
    pub fn new(state: Shared, stream: RequestStream, ctx: PolicyContext) -> Self {
        Metered { state, stream: Some(stream), ctx: Some(ctx) }
    }

    /// The next engine event (`None` once finished).
    pub async fn next(&mut self) -> Option<Event> {
        self.stream.as_mut()?.next().await
    }

    /// Records a request the engine failed (if it did work) and returns the error for the client:
    /// the ledger's, if recording failed, else the generation failure.
    pub async fn fail(&mut self, message: String, usage: &Usage) -> ApiError {
        match self.finish(Ended::Failed(message.clone()), usage).await {
            Err(ledger) => ledger,
            Ok(_) => generation_failed(message),
        }
    }

    /// Records how the request ended (durably) and returns its `billing` object; afterwards,
    /// dropping this records nothing more.
    pub async fn finish(&mut self, ended: Ended, usage: &Usage) -> Result<Option<Value>, ApiError> {
        self.stream = None;
        let Some(ctx) = self.ctx.take() else { return Ok(None) };
        record(&self.state, &ctx, ended, usage).await
    }
}

/// The client's error for a request the engine failed after accepting it.
pub fn generation_failed(message: String) -> ApiError {
    ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "server_error", "generation_failed", message)
}

impl Drop for Metered {
    fn drop(&mut self) {
        let (Some(stream), Some(ctx)) = (self.stream.take(), self.ctx.take()) else { return };
        stream.cancel();
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let state = self.state.clone();
        rt.spawn(async move {
            let mut stream = stream;
            while let Some(ev) = stream.next().await {
                let (ended, usage) = match ev {
                    Event::Token { .. } => continue,
                    Event::Done { reason, usage } => (Ended::Finished(reason), usage),
                    Event::Failed { message, usage } => (Ended::Failed(message), usage),
                };
                if let Err(e) = record(&state, &ctx, ended, &usage).await {
                    eprintln!("openlora: recording cancelled request {}: {}", ctx.info.request_id, e.message);
                }
                return;
            }
        });
    }
}
