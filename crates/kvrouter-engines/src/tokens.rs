//! The token-level upstream: a tokenized request (`PreprocessedRequest`, what
//! kvrouter's routers send a worker) forwarded to an OpenAI engine as
//! `POST /v1/completions` with the token ids as the prompt, so the engine
//! computes its blocks over exactly the router's tokens, and the streamed
//! chunks turned back into `LlmEngineOutput`s.
//!
//! Outputs carry the engine's token ids when it returns them
//! (`return_token_ids`, vLLM ≥ 0.26 and kvrouter's stand-in), else the
//! chunk's text. The final output carries the finish reason and the usage
//! (`stream_options.include_usage`). An engine 4xx is the client's error, a
//! 5xx or a failure mid-stream the engine's; a refused connection before any
//! answer is retryable.

use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use futures::stream::BoxStream;
use kvrouter_core::llm::{
    CompletionUsage, FinishReason, LlmEngineOutput, PreprocessedRequest, PromptTokensDetails,
};
use serde_json::{Value, json};

use crate::error::{Blame, ErrorCode, UpstreamError};
use crate::upstream::{ForwardRequest, HttpUpstream, Upstream};

/// The completions body for a tokenized request.
pub fn completions_body(req: &PreprocessedRequest, model: &str) -> Value {
    let s = &req.stop_conditions;
    let o = &req.sampling_options;
    let mut body = json!({
        "model": model, "prompt": req.token_ids, "stream": true,
        "stream_options": {"include_usage": true}, "return_token_ids": true,
    });
    let m = body.as_object_mut().expect("an object");
    let mut put = |k: &str, v: Value| {
        if !v.is_null() {
            m.insert(k.into(), v);
        }
    };
    put("max_tokens", json!(s.max_tokens));
    put("min_tokens", json!(s.min_tokens));
    put("ignore_eos", json!(s.ignore_eos));
    put("temperature", json!(o.temperature));
    put("top_p", json!(o.top_p));
    put("seed", json!(o.seed));
    body
}

fn finish_of(reason: &str) -> FinishReason {
    match reason {
        "length" => FinishReason::Length,
        "stop" => FinishReason::Stop,
        _ => FinishReason::Eos,
    }
}

/// One chunk's output, or `None` when it carries nothing.
fn output_of(v: &Value) -> Option<LlmEngineOutput> {
    let c = v.pointer("/choices/0")?;
    let token_ids: Vec<u32> = c
        .get("token_ids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_u64().map(|t| t as u32))
                .collect()
        })
        .unwrap_or_default();
    let text = c.get("text").and_then(Value::as_str).unwrap_or("");
    let finish = c
        .get("finish_reason")
        .and_then(Value::as_str)
        .map(finish_of);
    if token_ids.is_empty() && text.is_empty() && finish.is_none() {
        return None;
    }
    Some(LlmEngineOutput {
        text: (token_ids.is_empty() && !text.is_empty()).then(|| text.to_string()),
        token_ids,
        finish_reason: finish,
        ..Default::default()
    })
}

fn usage_of(v: &Value) -> Option<CompletionUsage> {
    let u = v.get("usage").filter(|u| u.is_object())?;
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
    Some(CompletionUsage {
        prompt_tokens: n("prompt_tokens"),
        completion_tokens: n("completion_tokens"),
        total_tokens: n("total_tokens"),
        prompt_tokens_details: u
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(Value::as_u64)
            .map(|c| PromptTokensDetails {
                cached_tokens: c as u32,
            }),
    })
}

/// Forwards tokenized requests to one OpenAI engine.
#[derive(Debug, Clone)]
pub struct TokenUpstream {
    http: HttpUpstream,
    model: String,
}

impl TokenUpstream {
    /// The engine at `base`, serving `model`.
    pub fn new(client: reqwest::Client, base: &str, model: &str, first_byte: Duration) -> Self {
        Self {
            http: HttpUpstream::new(client, base, first_byte),
            model: model.to_string(),
        }
    }

    /// Sends `req` (pinned to `dp_rank`, if given) and streams the engine's outputs.
    pub async fn generate(
        &self,
        req: &PreprocessedRequest,
        dp_rank: Option<u32>,
    ) -> Result<BoxStream<'static, Result<LlmEngineOutput, UpstreamError>>, UpstreamError> {
        let body = completions_body(req, &self.model);
        let resp = self
            .http
            .forward(ForwardRequest {
                path: "/v1/completions".into(),
                body: Bytes::from(body.to_string()),
                headers: vec![("content-type".into(), "application/json".into())],
                dp_rank,
            })
            .await?;
        if resp.status >= 400 {
            let mut text = Vec::new();
            let mut body = resp.body;
            while let Some(Ok(chunk)) = body.next().await {
                text.extend_from_slice(&chunk);
            }
            let text = String::from_utf8_lossy(&text).into_owned();
            return Err(if resp.status < 500 {
                UpstreamError::invalid(format!(
                    "the engine refused the request ({}): {text}",
                    resp.status
                ))
            } else {
                UpstreamError {
                    code: ErrorCode::EngineError,
                    message: format!("the engine failed ({}): {text}", resp.status),
                    retryable: false,
                    blame: Blame::Engine,
                }
            });
        }
        let events = resp.body.eventsource();
        // The finish is held back until the usage (or the end) arrives with it.
        let stream = futures::stream::unfold(
            (events, None::<LlmEngineOutput>, false),
            |(mut events, mut held, done)| async move {
                if done {
                    return None;
                }
                loop {
                    match events.next().await {
                        None => {
                            return match held.take() {
                                Some(last) => Some((Ok(last), (events, None, true))),
                                None => Some((
                                    Err(UpstreamError::mid_stream(
                                        "the engine ended the stream without finishing",
                                    )),
                                    (events, None, true),
                                )),
                            };
                        }
                        Some(Err(e)) => {
                            let err = UpstreamError::mid_stream(format!(
                                "the engine failed mid-stream: {e}"
                            ));
                            return Some((Err(err), (events, None, true)));
                        }
                        Some(Ok(ev)) if ev.data == "[DONE]" => {
                            if let Some(last) = held.take() {
                                return Some((Ok(last), (events, None, true)));
                            }
                        }
                        Some(Ok(ev)) => {
                            let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                                continue;
                            };
                            if let Some(e) = v.get("error") {
                                let err =
                                    UpstreamError::mid_stream(format!("the engine reported: {e}"));
                                return Some((Err(err), (events, None, true)));
                            }
                            if let Some(u) = usage_of(&v) {
                                if let Some(mut last) = held.take() {
                                    last.completion_usage = Some(u);
                                    return Some((Ok(last), (events, None, true)));
                                }
                                continue;
                            }
                            let Some(out) = output_of(&v) else { continue };
                            if out.finish_reason.is_some() {
                                held = Some(out);
                                continue;
                            }
                            return Some((Ok(out), (events, held, false)));
                        }
                    }
                }
            },
        );
        Ok(stream.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter_core::llm::{SamplingOptions, StopConditions};

    #[test]
    fn body_carries_tokens_and_sampling() {
        let req = PreprocessedRequest {
            token_ids: vec![5, 6, 7],
            stop_conditions: StopConditions {
                max_tokens: Some(4),
                ignore_eos: Some(true),
                ..Default::default()
            },
            sampling_options: SamplingOptions {
                temperature: Some(0.5),
                ..Default::default()
            },
            ..Default::default()
        };
        let b = completions_body(&req, "m");
        assert_eq!(b["prompt"], json!([5, 6, 7]));
        assert_eq!(b["max_tokens"], 4);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["temperature"], 0.5);
        assert!(b.get("seed").is_none());
        assert_eq!(b["return_token_ids"], true);
    }

    #[test]
    fn chunks_become_outputs() {
        let v = json!({"choices": [{"text": "hi", "token_ids": [9, 10], "finish_reason": null}]});
        let o = output_of(&v).unwrap();
        assert_eq!((o.token_ids, o.text), (vec![9, 10], None));
        let v = json!({"choices": [{"text": "hi", "finish_reason": "length"}]});
        let o = output_of(&v).unwrap();
        assert_eq!(o.text.as_deref(), Some("hi"));
        assert_eq!(o.finish_reason, Some(FinishReason::Length));
        assert!(output_of(&json!({"choices": [{"text": ""}]})).is_none());
        let u = usage_of(
            &json!({"usage": {"prompt_tokens": 3, "completion_tokens": 2,
            "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 2}}}),
        )
        .unwrap();
        assert_eq!(u.prompt_tokens_details.unwrap().cached_tokens, 2);
    }
}
