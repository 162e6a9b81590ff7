//! A routed job's answer: tokens detokenized, stop strings matched, and the
//! result sent as server-sent events ending in `data: [DONE]`, or collected
//! into one JSON body.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use kvrouter_core::llm::FinishReason;
use kvrouter_router::GenerateStream;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::stop::StopMatcher;
use crate::tokenizer::Detokenizer;

use super::pipeline::{Job, Kind, Tracker, count_rejected};
use super::{Backend, Frontend};
use crate::reasoning::ReasoningSplitter;

pub(super) async fn respond(
    s: Arc<Frontend>,
    kind: Kind,
    job: Result<Job, ApiError>,
    started: Instant,
    ttft_timeout: std::time::Duration,
) -> Response {
    let job = match job {
        Ok(j) => j,
        Err(e) => {
            count_rejected(&s, kind);
            return e.into_response();
        }
    };
    let id = s.next_id(match job.kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    });
    let mut tracker = Tracker::new(s.clone(), job.kind, job.stream, started);
    let model = [s.model.as_str()];
    s.metrics
        .isl
        .with_label_values(&model)
        .observe(job.request.token_ids.len() as f64);
    let mut job = job;
    if let Some((prefill, required)) = &s.prefill {
        match prefill.prefill(&job.request, &id).await {
            Ok(result) => job.request.prefill_result = Some(result),
            Err(e) if *required => {
                let mut err = ApiError::from(e);
                err.status = StatusCode::SERVICE_UNAVAILABLE;
                err.message = format!(
                    "prefill via {} failed and --enforce-disagg is set: {}",
                    prefill.endpoint(),
                    err.message
                );
                return err.into_response();
            }
            Err(e) => {
                tracing::warn!(error = %e, "prefill pool unavailable; serving aggregated");
            }
        }
    }
    let routed = match &s.backend {
        Backend::Workers(pool) => {
            let pinned = job
                .request
                .routing
                .as_ref()
                .and_then(|r| r.backend_instance_id);
            if let Some(w) = pinned.filter(|w| !pool.has_worker(*w)) {
                return ApiError::invalid(
                    format!("nvext.backend_instance_id {w} is not a worker of this model"),
                    Some("nvext"),
                )
                .into_response();
            }
            // The stream is handed out with its first response (or its failure).
            match tokio::time::timeout(ttft_timeout, pool.generate(&job.request, &id)).await {
                Ok(r) => r,
                Err(_) => return ttft_exceeded(ttft_timeout).into_response(),
            }
        }
        Backend::Engines(_) => {
            return ApiError::internal("engine requests are forwarded, not generated")
                .into_response();
        }
    };
    let routed = match routed {
        Ok(r) => r,
        Err(e) => {
            tracker.ok = false;
            return ApiError::from(e).into_response();
        }
    };
    let run = Run {
        detok: s.pre.decoder(),
        stop: StopMatcher::new(job.stops.clone()),
        s: s.clone(),
        routed,
        tracker,
        id,
        prompt_tokens: job.request.token_ids.len() as u32,
        cached_tokens: 0,
        kind: job.kind,
        pending_finish: None,
        last_ids: Vec::new(),
        return_token_ids: job.return_token_ids,
        reasoning: match job.kind {
            Kind::Chat => s.reasoning_parser().map(ReasoningSplitter::new),
            Kind::Completion => None,
        },
        reasoning_text: String::new(),
        created: super::unix_now(),
        delivered: false,
    };
    if job.stream {
        stream_response(run, job.include_usage)
    } else {
        unary_response(run).await
    }
}

/// 504: no first response from the worker or engine in time.
pub(crate) fn ttft_exceeded(t: std::time::Duration) -> ApiError {
    ApiError::timeout(format!(
        "no first response from the worker within {} s (--ttft-timeout)",
        t.as_secs_f64()
    ))
}

/// One request in flight: the routed stream and what is made of it.
pub(super) struct Run {
    s: Arc<Frontend>,
    routed: GenerateStream,
    detok: Detokenizer,
    stop: StopMatcher,
    tracker: Tracker,
    id: String,
    prompt_tokens: u32,
    cached_tokens: u32,
    kind: Kind,
    /// A finish reason to report after the text already returned.
    pending_finish: Option<&'static str>,
    /// Token ids not yet sent in a chunk (`return_token_ids`).
    last_ids: Vec<u32>,
    /// Put each chunk's token ids in it (vLLM's `return_token_ids`).
    return_token_ids: bool,
    /// When this response was created (Unix seconds), as OpenAI reports it.
    created: u64,
    /// The answer (or its error) reached the client's connection.
    delivered: bool,
    /// `--dyn-reasoning-parser` on a chat answer.
    reasoning: Option<ReasoningSplitter>,
    /// Reasoning text not yet sent (streams) or the whole of it (unary).
    reasoning_text: String,
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.delivered {
            // The response was dropped unfinished: the client went away.
            self.s
                .metrics
                .disconnected
                .with_label_values(&[self.s.model.as_str()])
                .inc();
        }
    }
}

/// One step of a run.
pub(super) enum Step {
    Text(String),
    Finished(&'static str),
    Failed(ApiError),
}

impl Run {
    async fn step(&mut self) -> Step {
        match self.routed.next().await {
            None => Step::Failed(ApiError::internal(
                "the worker ended the stream without a finish reason",
            )),
            Some(Err(e)) => Step::Failed(ApiError::from(e)),
            Some(Ok(out)) => {
                // Engines reached through `kvrouter engine` may answer text without ids.
                let text_only = out.token_ids.is_empty() && out.text.is_some();
                self.tracker
                    .tokens(out.token_ids.len() + usize::from(text_only));
                // Ids wait for the chunk that carries their text (or the finish).
                self.last_ids.extend_from_slice(&out.token_ids);
                if let Some(u) = out.completion_usage
                    && let Some(d) = u.prompt_tokens_details
                {
                    self.cached_tokens = d.cached_tokens;
                }
                let mut text = String::new();
                for &t in &out.token_ids {
                    if out.finish_reason == Some(FinishReason::Eos)
                        && self.s.pre.eos_token_ids().contains(&t)
                    {
                        continue;
                    }
                    let piece = self.detok.push(t);
                    text.push_str(&self.stop.push(&piece));
                }
                if let Some(t) = out.text.as_deref().filter(|_| text_only) {
                    text.push_str(&self.stop.push(t));
                }
                if self.stop.stopped() {
                    return Step::Finished("stop");
                }
                match out.finish_reason {
                    None => Step::Text(self.split(text, false)),
                    Some(r) => {
                        let reason = match r {
                            FinishReason::Length => "length",
                            FinishReason::Error => {
                                return Step::Failed(ApiError::internal("the worker failed"));
                            }
                            _ => "stop",
                        };
                        text.push_str(&self.stop.flush());
                        let text = self.split(text, true);
                        if text.is_empty() {
                            Step::Finished(reason)
                        } else {
                            // Deliver the last text first, then the finish.
                            self.pending_finish = Some(reason);
                            Step::Text(text)
                        }
                    }
                }
            }
        }
    }

    /// The content part of `text`; its reasoning waits in `reasoning_text`.
    fn split(&mut self, text: String, last: bool) -> String {
        let Some(splitter) = self.reasoning.as_mut() else {
            return text;
        };
        let mut part = splitter.push(&text);
        if last {
            let rest = splitter.finish();
            part.reasoning.push_str(&rest.reasoning);
            part.content.push_str(&rest.content);
        }
        self.reasoning_text.push_str(&part.reasoning);
        part.content
    }

    fn usage(&self) -> Value {
        let completion = self.tracker.tokens;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }

    fn finish(&mut self) {
        self.tracker.ok = true;
        let model = [self.s.model.as_str()];
        self.s
            .metrics
            .cached_tokens
            .with_label_values(&model)
            .observe(f64::from(self.cached_tokens));
    }

    fn chunk(&mut self, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        let created = self.created;
        match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                let reasoning = std::mem::take(&mut self.reasoning_text);
                if !reasoning.is_empty() {
                    delta.insert("reasoning_content".into(), json!(reasoning));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": created,
                    "model": self.s.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
            Kind::Completion => {
                let mut choice = json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish});
                if self.return_token_ids {
                    choice["token_ids"] = json!(std::mem::take(&mut self.last_ids));
                }
                json!({
                    "id": self.id, "object": "text_completion", "created": created,
                    "model": self.s.model, "choices": [choice],
                })
            }
        }
    }
}

pub(super) async fn unary_response(mut run: Run) -> Response {
    let mut text = String::new();
    let reason = loop {
        if let Some(r) = run.pending_finish.take() {
            break r;
        }
        match run.step().await {
            Step::Text(t) => text.push_str(&t),
            Step::Finished(r) => break r,
            Step::Failed(e) => {
                run.delivered = true;
                return e.into_response();
            }
        }
    };
    run.delivered = true;
    run.finish();
    let choice = match run.kind {
        Kind::Chat => {
            let mut message = json!({"role": "assistant", "content": text});
            if run.reasoning.is_some() {
                message["reasoning_content"] = json!(std::mem::take(&mut run.reasoning_text));
            }
            json!({"index": 0, "message": message, "logprobs": null, "finish_reason": reason})
        }
        Kind::Completion => json!({
            "index": 0, "text": text, "logprobs": null, "finish_reason": reason,
        }),
    };
    let object = match run.kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    axum::Json(json!({
        "id": run.id, "object": object, "created": run.created, "model": run.s.model,
        "choices": [choice], "usage": run.usage(),
        "nvext": {"worker_id": run.routed.worker_id(), "dp_rank": run.routed.dp_rank(),
                  "overlap_blocks": run.routed.overlap_blocks()},
    }))
    .into_response()
}

pub(super) enum Phase {
    Start,
    Body,
    Usage,
    Done,
    End,
}

pub(super) fn event(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

pub(super) fn stream_response(run: Run, include_usage: bool) -> Response {
    let state = (run, Phase::Start, include_usage);
    let events = futures::stream::unfold(state, |(mut run, phase, usage)| async move {
        match phase {
            Phase::Start => {
                let first = match run.kind {
                    Kind::Chat => vec![event(&run.chunk(Some(""), true, None))],
                    Kind::Completion => Vec::new(),
                };
                Some((first, (run, Phase::Body, usage)))
            }
            Phase::Body => {
                if let Some(reason) = run.pending_finish.take() {
                    run.finish();
                    let e = vec![event(&run.chunk(None, false, Some(reason)))];
                    let next = if usage { Phase::Usage } else { Phase::Done };
                    return Some((e, (run, next, usage)));
                }
                match run.step().await {
                    Step::Text(t) if t.is_empty() && run.reasoning_text.is_empty() => {
                        Some((Vec::new(), (run, Phase::Body, usage)))
                    }
                    Step::Text(t) => {
                        let e = vec![event(&run.chunk(Some(&t), false, None))];
                        Some((e, (run, Phase::Body, usage)))
                    }
                    Step::Finished(reason) => {
                        run.finish();
                        let e = vec![event(&run.chunk(None, false, Some(reason)))];
                        let next = if usage { Phase::Usage } else { Phase::Done };
                        Some((e, (run, next, usage)))
                    }
                    Step::Failed(err) => {
                        tracing::warn!(request_id = %run.id, error = %err.message, "stream failed");
                        Some((vec![event(&err.body())], (run, Phase::Done, usage)))
                    }
                }
            }
            Phase::Usage => {
                let mut v = run.chunk(None, false, None);
                v["choices"] = json!([]);
                v["usage"] = run.usage();
                Some((vec![event(&v)], (run, Phase::Done, usage)))
            }
            Phase::Done => {
                run.delivered = true;
                Some((
                    vec![Ok(Event::default().data("[DONE]"))],
                    (run, Phase::End, usage),
                ))
            }
            Phase::End => None,
        }
    })
    .flat_map(futures::stream::iter);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
