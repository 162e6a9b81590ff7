//! The HTTP server under the frontend's routes, hardened for the open
//! internet: a connection limit (past it a 503 in OpenAI error JSON, then the
//! connection is closed), a bound on the time a client may take to send its
//! headers and its body, size limits answered as JSON (413, 414, 431), every
//! error the framework itself produces turned into OpenAI error JSON, and a
//! two-stage shutdown — stop accepting and let in-flight requests finish for
//! the grace period, then end what is still streaming with an error event so
//! no client sees a stream cut without a reason.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// Longest request target answered (longer: 414).
pub const MAX_URI_BYTES: usize = 8 << 10;
/// Largest header section answered (larger: 431). hyper itself refuses, with an
/// empty 431, header sections beyond its read buffer (about 400 KiB).
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// After the grace period, how long the cut streams get to write their error event.
const CUT_BOUND: Duration = Duration::from_secs(5);

/// The HTTP server's limits and shutdown grace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Longest wait for a request's complete headers (also an idle keep-alive connection's).
    pub header_timeout: Duration,
    /// Longest wait for a request's complete body.
    pub body_timeout: Duration,
    /// Largest request body (larger: 413).
    pub max_body_bytes: usize,
    /// Connections served at once; one more gets a 503 and is closed.
    pub max_connections: usize,
    /// On shutdown, how long in-flight requests may take before they are ended with an error.
    pub graceful_timeout: Duration,
    /// Longest time a request may take, answer included (then 504 or an error event).
    pub request_timeout: Duration,
    /// Longest wait for a request's first response from its worker or engine (then 504).
    pub ttft_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_body_bytes: 8 << 20,
            max_connections: 4096,
            graceful_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(3600),
            ttft_timeout: Duration::from_secs(300),
        }
    }
}

/// Marks a response forwarded from an engine: its status and body reach the
/// client as the engine sent them, never rewritten into the router's JSON.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Forwarded;

/// Adds the edge's layers to `app`: size and time limits on each request, and
/// OpenAI error JSON for the framework's own error responses.
pub(crate) fn harden(app: Router, limits: HttpLimits) -> Router {
    app.layer(axum::Extension(limits))
        .layer(axum::middleware::from_fn(as_openai_error))
        .layer(axum::middleware::from_fn_with_state(limits, read_request))
        // The body is read (and bounded) by `read_request`; the extractors see it whole.
        .layer(axum::extract::DefaultBodyLimit::disable())
}

/// Checks the request's size and reads its body within the limits, so that a
/// slow or lying client (a `Content-Length` larger than what it sends) costs
/// at most `body_timeout`.
async fn read_request(State(l): State<HttpLimits>, req: Request, next: Next) -> Response {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return edge_error(
            StatusCode::URI_TOO_LONG,
            format!("the request target is {target} bytes; at most {MAX_URI_BYTES} are accepted"),
        );
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers > MAX_HEADER_BYTES {
        return edge_error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the headers are {headers} bytes; at most {MAX_HEADER_BYTES} are accepted"),
        );
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > l.max_body_bytes as u64) {
        return too_large(l.max_body_bytes);
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(
        l.body_timeout,
        axum::body::to_bytes(body, l.max_body_bytes),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let limited = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.into_inner()
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some();
            return if limited {
                too_large(l.max_body_bytes)
            } else {
                edge_error(
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read (malformed chunked encoding or a connection closed early)",
                )
            };
        }
        Err(_) => {
            return edge_error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    l.body_timeout.as_secs_f64()
                ),
            );
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn too_large(max: usize) -> Response {
    edge_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than {max} bytes (--http-max-body-bytes)"),
    )
}

fn edge_error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError::edge(status, message).into_response()
}

/// Rewrites an error response that carries no JSON — the framework's own 405,
/// a rejected extractor — into OpenAI error JSON with the same status and
/// headers. Engine answers ([`Forwarded`]) pass untouched.
async fn as_openai_error(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || json || res.extensions().get::<Forwarded>().is_some() {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_string(),
        t => t.to_string(),
    };
    let body = ApiError::edge(status, message).body().to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains: no new
/// connection is accepted, idle connections close, in-flight requests get
/// `graceful_timeout`, after which `cut` fires (streams end with an error
/// event) and the server returns at most [`CUT_BOUND`] later.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    cut: CancellationToken,
) -> std::io::Result<()> {
    let app = harden(app, limits);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or a reset before accept: keep serving the others.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Streamed responses are many small writes: without TCP_NODELAY, Nagle's
        // algorithm meets the client's delayed ACK and adds ~40 ms per response.
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(refuse(tcp, limits.max_connections));
            continue;
        };
        let conn = h1.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    tokio::select! {
        () = &mut drained => {}
        () = tokio::time::sleep(limits.graceful_timeout) => {
            tracing::warn!(
                "in-flight requests still running after the {} s grace period: ending them with an error",
                limits.graceful_timeout.as_secs_f64()
            );
            cut.cancel();
            let _ = tokio::time::timeout(CUT_BOUND, drained).await;
        }
    }
    Ok(())
}

/// Answers a connection past the limit with a 503 and closes it. The request is
/// read off (briefly) after the answer so that the close is not a reset that
/// would destroy the answer before the client reads it.
async fn refuse(mut tcp: TcpStream, limit: usize) {
    let body = ApiError::edge(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the server is at its limit of {limit} connections (--http-max-connections)"),
    )
    .body()
    .to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body.as_bytes()).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        while tcp.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Why a response was ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// The shutdown grace period is over.
    Shutdown,
    /// `--request-timeout` passed.
    Timeout,
}

/// Resolves when a request must end: at shutdown's cut or at its deadline.
pub(crate) async fn bounded(cut: CancellationToken, deadline: tokio::time::Instant) -> Stopped {
    tokio::select! {
        () = cut.cancelled_owned() => Stopped::Shutdown,
        () = tokio::time::sleep_until(deadline) => Stopped::Timeout,
    }
}

/// Ends `res`'s body when `stop` resolves. An event stream gets a last error
/// event saying why — a client reads that instead of a stream that just
/// stops; any other body can only be broken off.
pub(crate) fn until_stopped(
    res: Response,
    stop: impl std::future::Future<Output = Stopped> + Send + 'static,
    request_timeout: Duration,
) -> Response {
    use futures::StreamExt;
    let sse = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let (parts, body) = res.into_parts();
    let why = Arc::new(parking_lot::Mutex::new(None));
    let seen = why.clone();
    let stop = async move {
        let r = stop.await;
        *seen.lock() = Some(r);
    };
    let last = futures::stream::once(async move {
        let why = *why.lock();
        let e = match why? {
            Stopped::Shutdown => ApiError::shutting_down(),
            Stopped::Timeout => ApiError::timeout(format!(
                "the request did not finish within {} s (--request-timeout)",
                request_timeout.as_secs_f64()
            )),
        };
        Some(if sse {
            Ok(axum::body::Bytes::from(format!("data: {}\n\n", e.body())))
        } else {
            Err(std::io::Error::other(e.message))
        })
    })
    .filter_map(futures::future::ready);
    let body = body
        .into_data_stream()
        .map(|r| r.map_err(std::io::Error::other))
        .take_until(stop)
        .chain(last);
    Response::from_parts(parts, Body::from_stream(body))
}
