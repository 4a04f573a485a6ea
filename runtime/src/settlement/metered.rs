//! A request's engine stream that always ends in the ledger: read to its end, its settlement is
//! recorded by the caller ([`Metered::finish`]); dropped early (the client went away), the
//! request is cancelled and a background task waits for the engine's final usage and records
//! it, so work done for a client that left is still accounted for, exactly once.

use std::sync::Arc;

use serde_json::Value;

use super::context::{Context, SettleError};
use super::record::Recorder;
use crate::engine::{Ended, Event, RequestStream, Usage};

/// An engine stream with its settlement context, recorded in the ledger however it ends.
pub struct Metered {
    recorder: Arc<Recorder>,
    stream: Option<RequestStream>,
    ctx: Option<Context>,
}

impl Metered {
    pub(super) fn new(recorder: Arc<Recorder>, stream: RequestStream, ctx: Context) -> Self {
        Metered { recorder, stream: Some(stream), ctx: Some(ctx) }
    }

    /// The request's id.
    pub fn request_id(&self) -> &str {
        self.ctx.as_ref().map(|c| c.info.request_id.as_str()).unwrap_or_default()
    }

    /// The next engine event (`None` once finished).
    pub async fn next(&mut self) -> Option<Event> {
        self.stream.as_mut()?.next().await
    }

    /// Records how the request ended (durably) and returns its `billing` object; afterwards,
    /// dropping this records nothing more.
    pub async fn finish(&mut self, ended: Ended, usage: &Usage) -> Result<Option<Value>, SettleError> {
        self.stream = None;
        let Some(ctx) = self.ctx.take() else { return Ok(None) };
        self.recorder.record(&ctx, ended, usage).await
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let (Some(stream), Some(ctx)) = (self.stream.take(), self.ctx.take()) else { return };
        stream.cancel();
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let recorder = self.recorder.clone();
        let span = tracing::info_span!("request", id = %ctx.info.request_id, tenant = %ctx.info.tenant);
        rt.spawn(tracing::Instrument::instrument(
            async move {
                let mut stream = stream;
                while let Some(ev) = stream.next().await {
                    let (ended, usage) = match ev {
                        Event::Token { .. } => continue,
                        Event::Done { reason, usage } => (Ended::Finished(reason), usage),
                        Event::Failed { message, usage } => (Ended::Failed(message), usage),
                    };
                    match recorder.record(&ctx, ended, &usage).await {
                        Ok(_) => tracing::info!("the client left; what the request used is recorded"),
                        Err(e) => tracing::error!(error = %e, "recording a request whose client left failed"),
                    }
                    return;
                }
            },
            span,
        ));
    }
}
