//! The upstream seam: a routed request in, the engine's streamed answer out.
//!
//! [`HttpUpstream`] forwards a client's OpenAI request body unchanged to the
//! same path on the chosen engine and streams the response back as it
//! arrives, pinning a data-parallel rank with vLLM's `X-data-parallel-rank`
//! header. Failures before the response headers (refused, reset, DNS) are
//! retryable — nothing reached the client; a failure once the body streams is
//! not. [`observe`](crate::observe) reads the forwarded bytes to follow the
//! request's progress without changing them.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use reqwest::Client;

use crate::error::{ErrorCode, UpstreamError};

/// What is forwarded.
#[derive(Debug, Clone)]
pub struct ForwardRequest {
    /// Path and query, as the client sent them (`/v1/chat/completions`).
    pub path: String,
    /// The body, unchanged.
    pub body: Bytes,
    /// Headers passed on (content type, authorization, request id, …).
    pub headers: Vec<(String, String)>,
    /// The data-parallel rank to pin, when the engine has several.
    pub dp_rank: Option<u32>,
}

/// An engine's answer: status, content type and the streamed body.
pub struct UpstreamResponse {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, if the engine sent one.
    pub content_type: Option<String>,
    /// The body as it arrives; an `Err` ends it (the engine failed mid-stream).
    pub body: BoxStream<'static, Result<Bytes, UpstreamError>>,
}

/// Something that serves routed requests.
pub trait Upstream: Send + Sync {
    /// Forwards `req`; resolves once the response headers arrived.
    fn forward(
        &self,
        req: ForwardRequest,
    ) -> BoxFuture<'static, Result<UpstreamResponse, UpstreamError>>;
}

/// An OpenAI-compatible HTTP server (vLLM, SGLang, `trtllm-serve`, another frontend).
#[derive(Debug, Clone)]
pub struct HttpUpstream {
    client: Client,
    base: String,
    /// Longest wait for the response headers (time to first byte).
    pub first_byte_timeout: Duration,
}

impl HttpUpstream {
    /// The server at `base` (`http://host:port`).
    pub fn new(client: Client, base: &str, first_byte_timeout: Duration) -> Self {
        Self {
            client,
            base: base.trim_end_matches('/').to_string(),
            first_byte_timeout,
        }
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }
}

/// The header vLLM reads to pin a data-parallel rank.
pub const DP_RANK_HEADER: &str = "X-data-parallel-rank";

fn send_error(base: &str, e: &reqwest::Error) -> UpstreamError {
    if e.is_timeout() {
        UpstreamError {
            code: ErrorCode::Timeout,
            message: format!("engine {base} did not answer in time"),
            retryable: false,
            blame: crate::error::Blame::Engine,
        }
    } else {
        // Refused, reset or closed before the headers: nothing reached the client.
        UpstreamError::unreachable(format!("engine {base} unreachable: {e}"))
    }
}

impl Upstream for HttpUpstream {
    fn forward(
        &self,
        req: ForwardRequest,
    ) -> BoxFuture<'static, Result<UpstreamResponse, UpstreamError>> {
        let mut b = self
            .client
            .post(format!("{}{}", self.base, req.path))
            .body(req.body);
        for (k, v) in &req.headers {
            b = b.header(k, v);
        }
        if let Some(r) = req.dp_rank {
            b = b.header(DP_RANK_HEADER, r.to_string());
        }
        let base = self.base.clone();
        let timeout = self.first_byte_timeout;
        Box::pin(async move {
            let resp = match tokio::time::timeout(timeout, b.send()).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(send_error(&base, &e)),
                Err(_) => {
                    return Err(UpstreamError {
                        code: ErrorCode::Timeout,
                        message: format!(
                            "engine {base} sent no response within {} s",
                            timeout.as_secs_f64()
                        ),
                        retryable: false,
                        blame: crate::error::Blame::Engine,
                    });
                }
            };
            let status = resp.status().as_u16();
            let content_type = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp
                .bytes_stream()
                .map(move |r| {
                    r.map_err(|e| {
                        UpstreamError::mid_stream(format!("engine {base} failed mid-stream: {e}"))
                    })
                })
                .boxed();
            Ok(UpstreamResponse {
                status,
                content_type,
                body,
            })
        })
    }
}
