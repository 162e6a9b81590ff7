//! Requests for external engines: read just enough of the body to route it,
//! forward it unchanged, stream the engine's answer back unchanged.
//!
//! The body is parsed leniently — only `model`, `stream`, the prompt and
//! `nvext.router_config_override` are read — so every field the engine
//! implements (tools, logprobs, `n`, `response_format`, reasoning options)
//! reaches it as the client wrote it. The prompt is tokenized with the
//! frontend's tokenizer and chat template (`--model-path`) to find the
//! engine that caches its prefix; a prompt the template cannot render is
//! routed by load alone rather than refused, since the engine, not the
//! router, decides what is valid. The engine's status and body reach the
//! client as they are, 4xx included.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kvrouter_core::RouterConfigOverride;
use kvrouter_core::queue::priority_jump;
use kvrouter_engines::observe::Observation;
use kvrouter_engines::upstream::ForwardRequest;
use kvrouter_router::engines::{EnginePool, ForwardError};
use serde::Deserialize;
use serde_json::Value;

use crate::app::{Frontend, Kind, Tracker, check_model, count_rejected, header_dp_rank};
use crate::error::ApiError;
use crate::openai::{self, ChatRequest};
use crate::server::Forwarded;

/// Headers passed on to the engine (the rest are hop-by-hop or the router's own).
const FORWARDED: &[&str] = &["authorization", "x-request-id", "traceparent", "tracestate"];

fn path(kind: Kind) -> &'static str {
    match kind {
        Kind::Chat => "/v1/chat/completions",
        Kind::Completion => "/v1/completions",
    }
}

/// The prompt's tokens as the engine will see them, or none when they cannot be known.
fn tokens(s: &Frontend, kind: Kind, v: &Value) -> Vec<u32> {
    let found = match kind {
        Kind::Chat => ChatRequest::deserialize(v).ok().and_then(|req| {
            let messages = openai::normalise_messages(&req.messages).ok()?;
            let prompt = s.pre.render_chat(&messages, req.tools.as_ref()).ok()?;
            s.pre.encode(&prompt).ok()
        }),
        Kind::Completion => match v.get("prompt") {
            Some(Value::String(t)) => s.pre.encode(t).ok(),
            Some(Value::Array(a)) if a.iter().all(Value::is_u64) => Some(
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|t| t as u32)
                    .collect(),
            ),
            Some(Value::Array(a)) if a.len() == 1 => {
                a[0].as_str().and_then(|t| s.pre.encode(t).ok())
            }
            _ => None,
        },
    };
    found.unwrap_or_else(|| {
        tracing::debug!("prompt not tokenized; routing by load only");
        Vec::new()
    })
}

/// Handles one OpenAI request for `engines`.
pub(crate) async fn forward(
    s: Arc<Frontend>,
    engines: &Arc<EnginePool>,
    kind: Kind,
    headers: HeaderMap,
    body: Bytes,
    ttft_timeout: std::time::Duration,
) -> Response {
    let started = Instant::now();
    let checked = (|| {
        let v: Value = openai::parse(&body)?;
        let model = v
            .get("model")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid("`model` is required", Some("model")))?;
        check_model(&s, model)?;
        let dp_rank = header_dp_rank(&headers)?;
        Ok::<_, ApiError>((v, dp_rank))
    })();
    let (v, dp_rank) = match checked {
        Ok(c) => c,
        Err(e) => {
            count_rejected(&s, kind);
            return e.into_response();
        }
    };
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let t = Instant::now();
    let prompt = tokens(&s, kind, &v);
    s.metrics().preprocessing.observe(t.elapsed().as_secs_f64());
    let config_override: Option<RouterConfigOverride> = v
        .pointer("/nvext/router_config_override")
        .and_then(|o| serde_json::from_value(o.clone()).ok());
    let mut pass = vec![(
        header::CONTENT_TYPE.as_str().to_string(),
        "application/json".to_string(),
    )];
    for name in FORWARDED {
        if let Some(val) = headers.get(*name).and_then(|h| h.to_str().ok()) {
            pass.push((name.to_string(), val.to_string()));
        }
    }
    let id = s.next_id(match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    });
    let mut tracker = Tracker::new(s.clone(), kind, stream, started);
    let req = ForwardRequest {
        path: path(kind).into(),
        body,
        headers: pass,
        dp_rank: None,
    };
    let jump = priority_jump(v.pointer("/nvext/agent_hints/latency_sensitivity"));
    let forwarded = tokio::time::timeout(
        ttft_timeout,
        engines.forward(&prompt, config_override.as_ref(), &id, dp_rank, jump, req),
    );
    let mut routed = match forwarded.await {
        Err(_) => return crate::app::ttft_exceeded(ttft_timeout).into_response(),
        Ok(Ok(p)) => p,
        Ok(Err(ForwardError::Route(e))) => return ApiError::from(e).into_response(),
        Ok(Err(ForwardError::Upstream(e))) => return ApiError::from(e).into_response(),
    };
    tracker.ok = routed.status < 400;
    let model = s.model().to_string();
    let metrics = s.metrics().clone();
    routed.on_observation(Box::new(move |o| match o {
        Observation::Tokens(n) => tracker.tokens(*n),
        Observation::Usage(u) => {
            if let Some(c) = u.cached_tokens {
                metrics
                    .cached_tokens
                    .with_label_values(&[&model])
                    .observe(f64::from(c));
            }
        }
        Observation::Error(_) => tracker.ok = false,
    }));
    let status = StatusCode::from_u16(routed.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = routed
        .content_type
        .clone()
        .unwrap_or_else(|| "application/json".into());
    let worker = routed.worker_id.to_string();
    let rank = routed.dp_rank.to_string();
    let overlap = routed.overlap_blocks.to_string();
    let body = routed.into_body();
    let mut res = (
        status,
        [
            (header::CONTENT_TYPE.as_str(), content_type),
            ("x-kvrouter-worker-id", worker),
            ("x-kvrouter-dp-rank", rank),
            ("x-kvrouter-overlap-blocks", overlap),
        ],
        Body::from_stream(body),
    )
        .into_response();
    res.extensions_mut().insert(Forwarded);
    res
}
