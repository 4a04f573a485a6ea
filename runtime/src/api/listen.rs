//! The HTTP transport: connections accepted up to a cap, each served by hyper with header and
//! idle timeouts on a real timer, request bodies read with pause and total deadlines, and a
//! graceful shutdown that stops accepting and lets in-flight requests finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::ApiError;
use crate::config::LimitsConfig;

/// How long a shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` resolves, then waits for open connections to
/// finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &LimitsConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_timeout_secs as u64))
        .keep_alive(true);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = open.clone().acquire_owned() => slot,
            () = &mut shutdown => break,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    // Requests in flight finish; a stream that outlasts the drain is cut, so the ledger's head
    // is still signed before a supervisor's SIGKILL.
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!(seconds = DRAIN.as_secs(), "connections still open after the drain; closing them");
    }
    Ok(())
}

/// The outermost layer's function: a response to a request whose body was not read to its end
/// (refused before it: 401, 404, 405, ...) says `Connection: close`, so the client does not send
/// its next request on a connection the server is about to close.
pub async fn close_unless_read(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    // A request without a body (GET, DELETE) has nothing left unread.
    let empty = http_body::Body::is_end_stream(&body) || http_body::Body::size_hint(&body).exact() == Some(0);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(empty));
    let tracked = Body::new(Tracked { inner: body, done: done.clone() });
    let mut response = next.run(Request::from_parts(parts, tracked)).await;
    if !done.load(std::sync::atomic::Ordering::Relaxed) {
        response.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
    response
}

/// A request body that notes when it has been read to its end.
struct Tracked {
    inner: Body,
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None) = polled {
            self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        end
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How a body is read: at most `limit` bytes, each pause at most `pause`.
#[derive(Clone, Copy)]
pub struct BodyRead {
    /// Most bytes.
    pub limit: usize,
    /// Longest pause between chunks; the whole body may take twice this.
    pub pause: Duration,
}

/// A layer's function that reads the request's body within [`BodyRead`]'s deadlines and size
/// before the handler runs: a client that stalls gets 408, one that sends too much 413.
pub async fn read_body(State(read): State<BodyRead>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match collect(body, read).await {
        Ok(bytes) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Err(e) => e.into_response(),
    }
}

async fn collect(body: Body, read: BodyRead) -> Result<Bytes, ApiError> {
    let mut chunks = Chunks::new(body, read);
    let mut buf = Vec::new();
    while let Some(data) = chunks.next().await? {
        buf.extend_from_slice(&data);
    }
    Ok(Bytes::from(buf))
}

/// A body that paused or took too long (408).
pub(super) fn timed_out() -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "invalid_request_error",
        "request_timeout",
        "the request body was not received in time",
    )
}

/// A body over `limit` bytes (413).
pub(super) fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "request_too_large",
        format!("the request body is larger than {limit} bytes"),
    )
}

/// A body's chunks as they come, within [`BodyRead`]'s size, pause and total deadline.
pub(super) struct Chunks {
    body: Body,
    read: BodyRead,
    total: usize,
    deadline: tokio::time::Instant,
}

impl Chunks {
    /// Starts reading `body` (the total deadline runs from now).
    pub(super) fn new(body: Body, read: BodyRead) -> Self {
        Chunks { body, read, total: 0, deadline: tokio::time::Instant::now() + read.pause * 2 }
    }

    /// The next chunk; `None` at the end.
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>, ApiError> {
        loop {
            let until = self.deadline.min(tokio::time::Instant::now() + self.read.pause);
            let frame = match tokio::time::timeout_at(until, self.body.frame()).await {
                Err(_) => return Err(timed_out()),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(ApiError::invalid(None, format!("reading the request body: {e}"))),
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                self.total += data.len();
                if self.total > self.read.limit {
                    return Err(too_large(self.read.limit));
                }
                return Ok(Some(data));
            }
        }
    }
}
