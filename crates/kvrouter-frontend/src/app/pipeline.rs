//! From an OpenAI request to a routed job: the two endpoints' handlers, model
//! and header checks, templating and tokenizing into a preprocessed request,
//! and the tracker that counts every request in the frontend's metrics once.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use kvrouter_core::llm::{PreprocessedRequest, RoutingHints, SamplingOptions, StopConditions};
use serde_json::json;

use crate::error::ApiError;
use crate::openai::{self, ChatRequest, Common, CompletionRequest, Prompt};
use crate::server::{HttpLimits, bounded, until_stopped};

use super::respond::respond;
use super::{Backend, Frontend};

/// What both endpoints produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

impl Kind {
    pub(crate) fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "chat_completions",
            Kind::Completion => "completions",
        }
    }
}

/// A validated request, tokenized.
pub(super) struct Job {
    pub(super) kind: Kind,
    pub(super) stream: bool,
    pub(super) return_token_ids: bool,
    pub(super) include_usage: bool,
    pub(super) stops: Vec<String>,
    pub(super) request: PreprocessedRequest,
}

/// vLLM's header pinning a data-parallel rank.
const DP_RANK_HEADER: &str = "x-data-parallel-rank";

pub(crate) fn header_dp_rank(headers: &HeaderMap) -> Result<Option<u32>, ApiError> {
    let Some(v) = headers.get(DP_RANK_HEADER) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid(
                format!("the {DP_RANK_HEADER} header must be a rank number"),
                None,
            )
        })
}

/// What both OpenAI routes share: engines get the body as it came; mock
/// workers get the job `build` makes of it, answered by [`respond`].
///
/// Every request is bounded: its whole answer within `--request-timeout` and
/// nothing past the shutdown grace period (see [`bounded`]); the first
/// response from the worker or engine within `--ttft-timeout` (`respond`,
/// `passthrough`).
async fn dispatch(
    s: Arc<Frontend>,
    limits: HttpLimits,
    kind: Kind,
    headers: HeaderMap,
    body: Bytes,
    build: impl FnOnce(&Frontend, &Bytes, Option<u32>) -> Result<Job, ApiError> + Send + 'static,
) -> Response {
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started) + limits.request_timeout;
    let stop = bounded(s.cut.clone(), deadline);
    let answer = {
        let s = s.clone();
        async move {
            if let Backend::Engines(e) = &s.backend {
                let e = e.clone();
                return crate::passthrough::forward(
                    s,
                    &e,
                    kind,
                    headers,
                    body,
                    limits.ttft_timeout,
                )
                .await;
            }
            let job = match header_dp_rank(&headers) {
                Ok(dp_rank) => {
                    let p = s.clone();
                    s.preprocess(body.len(), move || build(&p, &body, dp_rank))
                        .await
                }
                Err(e) => Err(e),
            };
            respond(s, kind, job, started, limits.ttft_timeout).await
        }
    };
    let res = tokio::select! {
        r = answer => r,
        () = s.cut.cancelled() => return ApiError::shutting_down().into_response(),
        // The request's tracker, dropped with `answer`, counts it as an error.
        () = tokio::time::sleep_until(deadline) => {
            return ApiError::timeout(format!(
                "the request did not finish within {} s (--request-timeout)",
                limits.request_timeout.as_secs_f64()
            ))
            .into_response();
        }
    };
    until_stopped(res, stop, limits.request_timeout)
}

pub(super) async fn chat(
    State(s): State<Arc<Frontend>>,
    Extension(limits): Extension<HttpLimits>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    dispatch(s, limits, Kind::Chat, headers, body, |s, body, dp_rank| {
        let req: ChatRequest = openai::parse_for_generation(body)?;
        let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
        openai::validate(&req.common, max_tokens)?;
        check_model(s, &req.common.model)?;
        let messages = openai::normalise_messages(&req.messages)?;
        let t = Instant::now();
        let prompt = s
            .pre
            .render_chat(&messages, req.tools.as_ref())
            .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
        fits(s, &prompt, max_tokens)?;
        let tokens = s
            .pre
            .encode(&prompt)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        s.metrics.preprocessing.observe(t.elapsed().as_secs_f64());
        job(s, Kind::Chat, &req.common, max_tokens, tokens, dp_rank)
    })
    .await
}

pub(super) async fn completions(
    State(s): State<Arc<Frontend>>,
    Extension(limits): Extension<HttpLimits>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    dispatch(
        s,
        limits,
        Kind::Completion,
        headers,
        body,
        |s, body, dp_rank| {
            let req: CompletionRequest = openai::parse_for_generation(body)?;
            openai::validate(&req.common, req.common.max_tokens)?;
            check_model(s, &req.common.model)?;
            let t = Instant::now();
            let one = |n: usize| {
                if n == 1 {
                    Ok(())
                } else {
                    Err(ApiError::invalid(
                        format!("`prompt` holds {n} prompts; one per request is supported"),
                        Some("prompt"),
                    ))
                }
            };
            let tokens = match req.prompt {
                Prompt::Text(t) => {
                    fits(s, &t, req.common.max_tokens)?;
                    s.pre.encode(&t)
                }
                Prompt::Texts(v) => {
                    one(v.len())?;
                    fits(s, &v[0], req.common.max_tokens)?;
                    s.pre.encode(&v[0])
                }
                Prompt::Tokens(t) => Ok(t),
                Prompt::TokenLists(v) => {
                    one(v.len())?;
                    Ok(v.into_iter().next().unwrap_or_default())
                }
            }
            .map_err(|e| ApiError::internal(e.to_string()))?;
            s.metrics.preprocessing.observe(t.elapsed().as_secs_f64());
            // OpenAI's legacy default.
            let max_tokens = req.common.max_tokens.or(Some(16));
            job(
                s,
                Kind::Completion,
                &req.common,
                max_tokens,
                tokens,
                dp_rank,
            )
        },
    )
    .await
}

/// Refuses, before tokenizing, a prompt whose text is too long to fit the
/// context whatever its tokens turn out to be.
fn fits(s: &Frontend, text: &str, max_tokens: Option<u32>) -> Result<(), ApiError> {
    let least = s.pre.min_tokens(text);
    let context = s.pre.context_length() as usize;
    if least >= context || max_tokens.is_some_and(|m| least + m as usize > context) {
        return Err(ApiError::context_exceeded(
            s.pre.context_length(),
            least,
            max_tokens,
        ));
    }
    Ok(())
}

pub(crate) fn check_model(s: &Frontend, model: &str) -> Result<(), ApiError> {
    if model == s.model {
        Ok(())
    } else {
        Err(ApiError::unknown_model(model))
    }
}

pub(super) fn job(
    s: &Frontend,
    kind: Kind,
    c: &Common,
    max_tokens: Option<u32>,
    tokens: Vec<u32>,
    dp_rank: Option<u32>,
) -> Result<Job, ApiError> {
    if tokens.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    let vocab = s.pre.vocab_size();
    if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| **t >= vocab) {
        return Err(ApiError::invalid(
            format!("prompt token {i} is {t}, outside the vocabulary (ids 0..{vocab})"),
            Some("prompt"),
        ));
    }
    let context = s.pre.context_length();
    if tokens.len() >= context as usize
        || max_tokens.is_some_and(|m| tokens.len() + m as usize > context as usize)
    {
        return Err(ApiError::context_exceeded(
            context,
            tokens.len(),
            max_tokens,
        ));
    }
    let nvext = c.nvext.clone().unwrap_or_default();
    let extra_args = nvext
        .agent_hints
        .as_ref()
        .map(|h| json!({"agent_hints": h}));
    Ok(Job {
        kind,
        stream: c.stream.unwrap_or(false),
        return_token_ids: c.return_token_ids.unwrap_or(false),
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        stops: c.stop_strings(),
        request: PreprocessedRequest {
            model: s.model.clone(),
            token_ids: tokens,
            stop_conditions: StopConditions {
                max_tokens,
                stop: None,
                min_tokens: c.min_tokens,
                ignore_eos: c.ignore_eos.or(nvext.ignore_eos),
            },
            sampling_options: SamplingOptions {
                temperature: c.temperature,
                top_p: c.top_p,
                seed: c.seed,
            },
            eos_token_ids: s.pre.eos_token_ids().to_vec(),
            routing: (nvext.backend_instance_id.is_some() || dp_rank.is_some()).then_some(
                RoutingHints {
                    dp_rank,
                    backend_instance_id: nvext.backend_instance_id,
                },
            ),
            router_config_override: nvext.router_config_override,
            extra_args,
            ..Default::default()
        },
    })
}

/// Per-request metrics, settled when dropped (also on disconnect).
pub(crate) struct Tracker {
    s: Arc<Frontend>,
    kind: Kind,
    stream: bool,
    started: Instant,
    last: Option<Instant>,
    pub(super) tokens: u32,
    pub(crate) ok: bool,
}

impl Tracker {
    pub(crate) fn new(s: Arc<Frontend>, kind: Kind, stream: bool, started: Instant) -> Self {
        let model = [s.model.as_str()];
        s.metrics.inflight.with_label_values(&model).inc();
        s.metrics.queued.with_label_values(&model).inc();
        Self {
            s,
            kind,
            stream,
            started,
            last: None,
            tokens: 0,
            ok: false,
        }
    }

    pub(crate) fn tokens(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let m = &self.s.metrics;
        let model = [self.s.model.as_str()];
        match self.last {
            None => {
                m.queued.with_label_values(&model).dec();
                m.ttft
                    .with_label_values(&model)
                    .observe((now - self.started).as_secs_f64());
            }
            Some(prev) => m
                .itl
                .with_label_values(&model)
                .observe((now - prev).as_secs_f64() / n as f64),
        }
        self.last = Some(now);
        self.tokens += n as u32;
        m.output_tokens.with_label_values(&model).inc_by(n as u64);
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let m = &self.s.metrics;
        let model = [self.s.model.as_str()];
        m.inflight.with_label_values(&model).dec();
        if self.last.is_none() {
            m.queued.with_label_values(&model).dec();
        }
        m.duration
            .with_label_values(&model)
            .observe(self.started.elapsed().as_secs_f64());
        m.osl
            .with_label_values(&model)
            .observe(f64::from(self.tokens));
        let status = if self.ok { "success" } else { "error" };
        let rtype = if self.stream { "stream" } else { "unary" };
        m.requests
            .with_label_values(&[&self.s.model, self.kind.endpoint(), rtype, status])
            .inc();
    }
}

pub(crate) fn count_rejected(s: &Frontend, kind: Kind) {
    s.metrics
        .requests
        .with_label_values(&[&s.model, kind.endpoint(), "unary", "rejected"])
        .inc();
}
