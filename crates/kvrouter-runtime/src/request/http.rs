//! The HTTP request plane: `POST /v1/rpc` with the response streamed back.
//!
//! The response body is a sequence of the TCP plane's frames (data, then end
//! or error; request id 0), so both planes share one codec. A caller that
//! drops the response closes its connection; the server drops the body stream
//! and the handler's token fires.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::post;
use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Handler, Kind, RequestError};

fn encode(kind: Kind, payload: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(13 + payload.len());
    v.extend_from_slice(&((9 + payload.len()) as u32).to_be_bytes());
    v.push(kind as u8);
    v.extend_from_slice(&0u64.to_be_bytes());
    v.extend_from_slice(payload);
    v.into()
}

/// The axum router serving `handler` at `POST /v1/rpc`.
pub fn http_router(handler: Arc<dyn Handler>) -> axum::Router {
    axum::Router::new()
        .route("/v1/rpc", post(rpc))
        .with_state(handler)
}

async fn rpc(State(handler): State<Arc<dyn Handler>>, body: Bytes) -> axum::response::Response {
    let token = CancellationToken::new();
    // Dropped with the body stream, i.e. when the caller goes away.
    let guard: DropGuard = token.clone().drop_guard();
    let responses = handler.handle(body, token);
    let frames = responses
        .map(|item| {
            Ok::<_, std::convert::Infallible>(match item {
                Ok(data) => encode(Kind::Data, &data),
                Err(e) => encode(Kind::Error, e.as_bytes()),
            })
        })
        .chain(futures::stream::once(async { Ok(encode(Kind::End, b"")) }))
        .map(move |f| {
            let _keep = &guard;
            f
        });
    axum::response::Response::new(Body::from_stream(frames))
}

/// A caller of one HTTP instance (`http://host:port`).
#[derive(Clone)]
pub struct HttpRequester {
    client: reqwest::Client,
    url: String,
}

impl HttpRequester {
    /// Calls `base` (`http://host:port`), failing fast when nothing answers within `connect_timeout`.
    pub fn new(base: &str, connect_timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .build()
            .expect("a plain HTTP client builds");
        Self {
            client,
            url: format!("{}/v1/rpc", base.trim_end_matches('/')),
        }
    }

    /// Sends a request; responses arrive on the returned stream.
    pub async fn request(&self, body: Bytes) -> Result<HttpResponseStream, RequestError> {
        let resp = self
            .client
            .post(&self.url)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() || e.is_timeout() {
                    RequestError::Unreachable(self.url.clone())
                } else {
                    RequestError::ConnectionLost
                }
            })?;
        if !resp.status().is_success() {
            return Err(RequestError::Remote(format!("HTTP {}", resp.status())));
        }
        let (tx, rx) = mpsc::channel(256);
        let mut bytes = resp.bytes_stream();
        let task = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            while let Some(chunk) = bytes.next().await {
                let Ok(chunk) = chunk else {
                    let _ = tx.send(Err(RequestError::ConnectionLost)).await;
                    return;
                };
                buf.extend_from_slice(&chunk);
                while buf.len() >= 4 {
                    let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
                    if len < 9 || buf.len() < 4 + len {
                        if len < 9 {
                            let _ = tx
                                .send(Err(RequestError::Remote("malformed frame".into())))
                                .await;
                            return;
                        }
                        break;
                    }
                    buf.advance(4);
                    let kind = buf[0];
                    buf.advance(9);
                    let payload = buf.split_to(len - 9).freeze();
                    let item = match kind {
                        k if k == Kind::Data as u8 => Ok(payload),
                        k if k == Kind::Error as u8 => Err(RequestError::Remote(
                            String::from_utf8_lossy(&payload).into_owned(),
                        )),
                        _ => return, // end
                    };
                    let last = item.is_err();
                    if tx.send(item).await.is_err() || last {
                        return;
                    }
                }
            }
            let _ = tx.send(Err(RequestError::ConnectionLost)).await;
        });
        Ok(HttpResponseStream { rx, task })
    }
}

/// Responses of one HTTP request; dropping it closes the connection (cancelling).
pub struct HttpResponseStream {
    rx: mpsc::Receiver<Result<Bytes, RequestError>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpResponseStream {
    /// The next response; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Result<Bytes, RequestError>> {
        self.rx.recv().await
    }
}

impl Drop for HttpResponseStream {
    fn drop(&mut self) {
        // Dropping the body stream closes the connection: the server sees it.
        self.task.abort();
    }
}
