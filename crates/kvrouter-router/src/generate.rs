//! The routed call: [`WorkerPool::generate`] routes a request, sends it over
//! the request plane and streams the worker's outputs back while the router
//! follows the request.
//!
//! Two kinds of worker failure are survived. Before the first response nothing
//! has reached the client, so a worker that cannot be reached or whose
//! connection breaks costs a retry on another worker (at most
//! [`MAX_ATTEMPTS`] workers). After it, with a migration limit N > 0
//! (`--migration-limit`, reference §16), a stream whose worker fails (its
//! connection lost, or an error blaming the engine) continues on another
//! worker as a new request made of the prompt plus every token generated so
//! far, with the output budget reduced by those tokens — up to N times — so the
//! client sees one uninterrupted stream; usage is reported against the
//! original prompt. Errors that are the request's fault are never migrated.

use std::sync::Arc;

use bytes::Bytes;
use kvrouter_core::error::{Blame, UpstreamError};
use kvrouter_core::llm::{LlmEngineOutput, PreprocessedRequest};
use kvrouter_runtime::endpoint::InstanceId;
use kvrouter_runtime::node::Responses;
use kvrouter_runtime::request::RequestError;

use crate::router::{ActiveRequest, RouteQuery};
use crate::workers::{GenerateError, WorkerPool};

/// Attempts per request when workers fail before their first response.
pub const MAX_ATTEMPTS: usize = 3;

/// One worker's part of a request.
struct Leg {
    responses: Responses,
    /// The first response, read before the leg was handed out.
    first: Option<Option<Result<Bytes, RequestError>>>,
    active: ActiveRequest,
    worker_id: InstanceId,
    address: String,
    overlap_blocks: u32,
}

/// Counts a stream in flight while it lives (for a graceful stop).
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn new(n: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a stream needs to move to another worker.
struct Migration {
    pool: Arc<WorkerPool>,
    request_id: String,
    /// The request as first sent.
    request: PreprocessedRequest,
    /// Every token streamed so far, over all legs.
    generated: Vec<u32>,
    /// Moves left.
    left: u32,
    /// Whether the stream has moved at least once.
    moved: bool,
}

impl WorkerPool {
    /// Routes `req` (tracked as `request_id`), sends it, and streams the outputs.
    ///
    /// A worker that cannot be reached before anything was sent is skipped and
    /// the request routed again (up to three workers); with a migration limit,
    /// a stream whose worker fails later continues on another worker.
    pub async fn generate(
        self: &Arc<Self>,
        req: &PreprocessedRequest,
        request_id: &str,
    ) -> Result<GenerateStream, GenerateError> {
        // What the worker gets: the request with its id and, per attempt, its rank.
        let mut sent = req.clone();
        sent.request_id = Some(request_id.to_string());
        let leg = self.send(&sent, request_id).await?;
        let limit = self.migration_limit();
        // A request pinned to one worker cannot move.
        let pinned = req
            .routing
            .as_ref()
            .is_some_and(|r| r.backend_instance_id.is_some());
        Ok(GenerateStream {
            leg,
            _in_flight: InFlight::new(&self.in_flight),
            done: false,
            migration: (limit > 0 && !pinned).then(|| Migration {
                pool: self.clone(),
                request_id: request_id.to_string(),
                request: sent,
                generated: Vec::new(),
                left: limit,
                moved: false,
            }),
        })
    }

    /// Routes and sends `sent` until a worker gives its first response.
    async fn send(
        &self,
        sent: &PreprocessedRequest,
        request_id: &str,
    ) -> Result<Leg, GenerateError> {
        let mut sent = sent.clone();
        let mut exclude = Vec::new();
        let mut failed = 0;
        // Held here while every worker is saturated (the router queue).
        let mut turn = Some(
            self.router
                .turn(sent.token_ids.len(), sent.priority_jump())
                .await,
        );
        loop {
            let mut avoid = self.down.ids();
            avoid.extend_from_slice(&exclude);
            let q = RouteQuery {
                tokens: &sent.token_ids,
                config_override: sent.router_config_override.as_ref(),
                dp_rank: sent.dp_rank(),
                worker_id: sent.routing.as_ref().and_then(|r| r.backend_instance_id),
                exclude: &avoid,
            };
            let routing = self.router.select(&q)?;
            let active = self
                .router
                .begin(request_id, &routing, sent.expected_output_tokens());
            // Committed: its load is counted, the next held request may go.
            drop(turn.take());
            let worker_id = routing.worker.worker_id;
            let Some(address) = self.address_of(worker_id) else {
                exclude.push(worker_id);
                continue;
            };
            // The worker learns its rank from the routing hints.
            sent.routing.get_or_insert_with(Default::default).dp_rank =
                Some(routing.worker.dp_rank);
            let body = Bytes::from(serde_json::to_vec(&sent).expect("requests serialize"));
            // Until the first response nothing has reached the client: a worker
            // that cannot be reached, or whose connection breaks before it
            // answers, costs a retry on another worker, not an error.
            let outcome = match self.node.call(&address, body).await {
                Ok(mut responses) => match responses.next().await {
                    Some(Err(RequestError::ConnectionLost)) => Err(RequestError::ConnectionLost),
                    first => Ok((responses, first)),
                },
                Err(e) => Err(e),
            };
            match outcome {
                Ok((responses, first)) => {
                    return Ok(Leg {
                        responses,
                        first: Some(first),
                        active,
                        worker_id,
                        address,
                        overlap_blocks: routing.overlap_blocks,
                    });
                }
                Err(e) if e.retryable() || e == RequestError::ConnectionLost => {
                    drop(active);
                    self.down.mark(worker_id, &address, &e.to_string());
                    exclude.push(worker_id);
                    failed += 1;
                    if failed >= MAX_ATTEMPTS {
                        return Err(GenerateError::Upstream {
                            worker_id,
                            source: e,
                        });
                    }
                    self.router
                        .metrics()
                        .migrations
                        .with_label_values(&["new_request"])
                        .inc();
                    tracing::warn!(worker = worker_id, error = %e, "worker failed before answering; routing again");
                }
                Err(source) => return Err(GenerateError::Upstream { worker_id, source }),
            }
        }
    }
}

/// A worker's outputs for one request; dropping it cancels the request and
/// frees it in the router.
pub struct GenerateStream {
    leg: Leg,
    _in_flight: InFlight,
    done: bool,
    /// Set when the pool has a migration limit.
    migration: Option<Migration>,
}

impl GenerateStream {
    /// The worker serving the request (the latest, after a migration).
    pub fn worker_id(&self) -> InstanceId {
        self.leg.worker_id
    }

    /// The data-parallel rank serving the request.
    pub fn dp_rank(&self) -> u32 {
        self.leg.active.worker().dp_rank
    }

    /// Prompt blocks the router predicted cached on the first worker.
    pub fn overlap_blocks(&self) -> u32 {
        self.leg.overlap_blocks
    }

    /// The next output; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Result<LlmEngineOutput, GenerateError>> {
        loop {
            if self.done {
                return None;
            }
            let raw = match self.leg.first.take() {
                Some(first) => first,
                None => self.leg.responses.next().await,
            };
            let worker_id = self.leg.worker_id;
            let failure = match raw {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Ok(bytes)) => {
                    let mut out = match serde_json::from_slice::<LlmEngineOutput>(&bytes) {
                        Ok(out) => out,
                        Err(e) => {
                            self.done = true;
                            let message = e.to_string();
                            return Some(Err(GenerateError::Protocol { worker_id, message }));
                        }
                    };
                    self.leg.active.on_tokens(out.token_ids.len());
                    if let Some(m) = &mut self.migration {
                        m.generated.extend_from_slice(&out.token_ids);
                        if m.moved {
                            m.correct_usage(&mut out);
                        }
                    }
                    if out.finish_reason.is_some() {
                        self.done = true;
                    }
                    return Some(Ok(out));
                }
                Some(Err(source)) => source,
            };
            let can_move = self.migration.as_ref().is_some_and(|m| m.left > 0);
            if !can_move || !worker_failed(&failure) {
                self.done = true;
                return Some(Err(GenerateError::Upstream {
                    worker_id,
                    source: failure,
                }));
            }
            if let Err(e) = self.migrate(&failure).await {
                self.done = true;
                return Some(Err(e));
            }
        }
    }

    /// Continues the request on another worker.
    async fn migrate(&mut self, failure: &RequestError) -> Result<(), GenerateError> {
        let m = self.migration.as_mut().expect("checked by the caller");
        let pool = m.pool.clone();
        let from = self.leg.worker_id;
        pool.down
            .mark(from, &self.leg.address, &failure.to_string());
        let Some(next) = m.continuation() else {
            // Every token was generated; only the finish was lost.
            return Err(GenerateError::Upstream {
                worker_id: from,
                source: failure.clone(),
            });
        };
        m.left -= 1;
        m.moved = true;
        pool.router()
            .metrics()
            .migrations
            .with_label_values(&["ongoing_request"])
            .inc();
        tracing::warn!(
            worker = from,
            generated = m.generated.len(),
            error = %failure,
            "worker failed mid-stream; migrating the request"
        );
        let request_id = m.request_id.clone();
        // The old leg is dropped (and freed in the router) once the new one runs.
        self.leg = pool.send(&next, &request_id).await?;
        Ok(())
    }
}

impl Migration {
    /// The request that continues this one: the prompt and everything
    /// generated, with the budget reduced; `None` if no budget is left.
    fn continuation(&self) -> Option<PreprocessedRequest> {
        let mut next = self.request.clone();
        let g = self.generated.len() as u32;
        next.token_ids.extend_from_slice(&self.generated);
        if let Some(max) = next.stop_conditions.max_tokens {
            if max <= g {
                return None;
            }
            next.stop_conditions.max_tokens = Some(max - g);
        }
        if let Some(min) = next.stop_conditions.min_tokens {
            next.stop_conditions.min_tokens = Some(min.saturating_sub(g));
        }
        // Another worker: the failed one's rank hint and prefilled KV no longer apply.
        if let Some(r) = next.routing.as_mut() {
            r.dp_rank = None;
        }
        next.prefill_result = None;
        Some(next)
    }

    /// A continued leg counts the tokens it was given as prompt: report
    /// against the original prompt instead.
    fn correct_usage(&self, out: &mut LlmEngineOutput) {
        let Some(u) = out.completion_usage.as_mut() else {
            return;
        };
        let prompt = self.request.token_ids.len() as u32;
        let completion = self.generated.len() as u32;
        u.prompt_tokens = prompt;
        u.completion_tokens = completion;
        u.total_tokens = prompt + completion;
        if let Some(d) = u.prompt_tokens_details.as_mut() {
            d.cached_tokens = d.cached_tokens.min(prompt);
        }
    }
}

/// Whether `e` is the worker's failure, not the request's.
fn worker_failed(e: &RequestError) -> bool {
    match e {
        RequestError::ConnectionLost | RequestError::Unreachable(_) => true,
        // The engine's own failure (dropped the request, crashed mid-pass), not
        // a refusal of the request: another worker may finish it.
        RequestError::Remote(wire) => UpstreamError::from_wire(wire).blame == Blame::Engine,
        RequestError::TooLarge(_) => false,
    }
}
