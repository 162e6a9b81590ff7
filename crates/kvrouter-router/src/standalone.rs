//! The standalone router: KV-aware routing for any worker endpoint, served as
//! two endpoints of its own (reference §8).
//!
//! - `{namespace}.router.generate` takes a `PreprocessedRequest`, routes it,
//!   and streams the worker's `LlmEngineOutput`s back; the router's model of
//!   the request is kept up to date exactly as in the frontend (added when
//!   routed, prefill done at the first output, freed at the end, on error or
//!   when the caller cancels).
//! - `{namespace}.router.best_worker_id` takes `{"token_ids": [...],
//!   "router_config_override"?: {...}}` and answers one
//!   `{"worker_id", "dp_rank", "overlap_blocks"}` without changing any state.
//!
//! Errors travel as the request plane's error message, a JSON object
//! `{"code", "message"}` with `code` one of `invalid_request`, `no_workers`,
//! `all_workers_busy`, `worker_failed` — typed, and never a hang.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use kvrouter_core::RouterConfigOverride;
use kvrouter_core::llm::PreprocessedRequest;
use kvrouter_runtime::endpoint::{EndpointId, InstanceId};
use kvrouter_runtime::node::{Node, ServeError, Served};
use kvrouter_runtime::request::Handler;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::router::{RouteError, RouteQuery};
use crate::workers::{GenerateError, WorkerPool};

/// The component standalone routers register under.
pub const ROUTER_COMPONENT: &str = "router";

/// `{namespace}.router.{endpoint}`.
pub fn router_endpoint(namespace: &str, endpoint: &str) -> EndpointId {
    EndpointId {
        namespace: namespace.into(),
        component: ROUTER_COMPONENT.into(),
        endpoint: endpoint.into(),
    }
}

/// A `best_worker_id` query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BestWorkerRequest {
    /// The prompt's tokens.
    pub token_ids: Vec<u32>,
    /// Per-request router configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_config_override: Option<RouterConfigOverride>,
}

/// A `best_worker_id` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BestWorker {
    /// The worker.
    pub worker_id: u64,
    /// Its data-parallel rank.
    pub dp_rank: u32,
    /// Prompt blocks it caches.
    pub overlap_blocks: u32,
    /// An external engine's OpenAI server (`kvrouter engine`), for a gateway
    /// that forwards the request itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_url: Option<String>,
}

/// A failed router call, as the typed error's wire form (`{"code",
/// "message", "retryable", "blame"}`, `code` one of `invalid_request`,
/// `no_workers`, `all_workers_busy`, `worker_failed`).
pub fn error_json(code: &str, message: impl std::fmt::Display) -> String {
    use kvrouter_core::error::{ErrorCode, UpstreamError};
    let message = message.to_string();
    let e = match code {
        "invalid_request" => UpstreamError::invalid(message),
        "no_workers" => UpstreamError::router(ErrorCode::NoWorkers, message),
        "all_workers_busy" => UpstreamError::router(ErrorCode::AllWorkersBusy, message),
        _ => UpstreamError::router(ErrorCode::WorkerFailed, message),
    };
    e.to_wire()
}

fn route_error(e: &RouteError) -> String {
    let code = match e {
        RouteError::NoWorkers => "no_workers",
        RouteError::AllWorkersBusy(_) => "all_workers_busy",
        RouteError::Invalid(_) => "invalid_request",
    };
    error_json(code, e)
}

fn generate_error(e: &GenerateError) -> String {
    match e {
        GenerateError::Route(r) => route_error(r),
        // The worker's own typed error goes on as it came.
        GenerateError::Upstream {
            source: kvrouter_runtime::request::RequestError::Remote(m),
            ..
        } => kvrouter_core::error::UpstreamError::from_wire(m).to_wire(),
        other => error_json("worker_failed", other),
    }
}

fn fail(msg: String) -> BoxStream<'static, Result<Bytes, String>> {
    futures::stream::once(async move { Err(msg) }).boxed()
}

struct Generate {
    pool: Arc<WorkerPool>,
    ids: AtomicU64,
    instance: InstanceId,
}

impl Handler for Generate {
    fn handle(
        &self,
        request: Bytes,
        _cancel: CancellationToken,
    ) -> BoxStream<'static, Result<Bytes, String>> {
        let req: PreprocessedRequest = match serde_json::from_slice(&request) {
            Ok(r) => r,
            Err(e) => return fail(error_json("invalid_request", e)),
        };
        let id = req.request_id.clone().unwrap_or_else(|| {
            format!(
                "router-{:x}-{}",
                self.instance,
                self.ids.fetch_add(1, Ordering::Relaxed)
            )
        });
        let pool = self.pool.clone();
        // Dropping this stream (the caller cancelled) drops the routed stream,
        // which cancels the worker's request and frees it in the router.
        futures::stream::once(async move { pool.generate(&req, &id).await })
            .flat_map(|started| match started {
                Err(e) => fail(generate_error(&e)),
                Ok(stream) => futures::stream::unfold(Some(stream), |state| async move {
                    let mut s = state?;
                    match s.next().await? {
                        Ok(out) => {
                            let bytes = serde_json::to_vec(&out).expect("outputs serialize");
                            Some((Ok(Bytes::from(bytes)), Some(s)))
                        }
                        Err(e) => Some((Err(generate_error(&e)), None)),
                    }
                })
                .boxed(),
            })
            .boxed()
    }
}

struct Best {
    pool: Arc<WorkerPool>,
}

impl Handler for Best {
    fn handle(
        &self,
        request: Bytes,
        _cancel: CancellationToken,
    ) -> BoxStream<'static, Result<Bytes, String>> {
        let req: BestWorkerRequest = match serde_json::from_slice(&request) {
            Ok(r) => r,
            Err(e) => return fail(error_json("invalid_request", e)),
        };
        let q = RouteQuery {
            tokens: &req.token_ids,
            config_override: req.router_config_override.as_ref(),
            ..RouteQuery::default()
        };
        let answer = self.pool.router().select(&q).map(|r| BestWorker {
            worker_id: r.worker.worker_id,
            dp_rank: r.worker.dp_rank,
            overlap_blocks: r.overlap_blocks,
            engine_url: self.pool.engine_url(r.worker.worker_id),
        });
        let item = match answer {
            Ok(b) => Ok(Bytes::from(
                serde_json::to_vec(&b).expect("answers serialize"),
            )),
            Err(e) => Err(route_error(&e)),
        };
        futures::stream::once(async move { item }).boxed()
    }
}

/// A running standalone router; dropping it deregisters both endpoints.
pub struct StandaloneRouter {
    /// The worker pool it routes over.
    pub pool: Arc<WorkerPool>,
    /// Its `generate` registration.
    pub generate: Served,
    /// Its `best_worker_id` registration.
    pub best_worker_id: Served,
}

impl StandaloneRouter {
    /// Stops gracefully: leaves discovery (awaited), lets the streams in
    /// flight finish for up to `grace`, then stops serving; returns how many
    /// were still running (and are cut).
    pub async fn stop(mut self, grace: std::time::Duration) -> usize {
        self.generate.deregister().await;
        self.best_worker_id.deregister().await;
        let deadline = tokio::time::Instant::now() + grace;
        while self.pool.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.pool.in_flight()
    }

    /// Serves `pool`'s routing as `{namespace}.router.{generate,best_worker_id}`, instance `id`.
    pub async fn start(
        node: &Node,
        namespace: &str,
        id: InstanceId,
        pool: Arc<WorkerPool>,
    ) -> Result<Self, ServeError> {
        // Readable as worker metadata, so a frontend can route to routers
        // (`--router-endpoint`) with the same pool it uses for workers.
        let meta = json!({
            "kind": "router", "worker_endpoint": pool.endpoint(),
            "model_name": "", "block_size": pool.router().block_size(),
            "total_kv_blocks": 0, "max_num_seqs": 0, "max_num_batched_tokens": 0,
            "data_parallel_size": 1,
        });
        let generate = node
            .serve(
                &router_endpoint(namespace, "generate"),
                id,
                Arc::new(Generate {
                    pool: pool.clone(),
                    ids: AtomicU64::new(1),
                    instance: id,
                }),
                meta.clone(),
            )
            .await?;
        let best_worker_id = node
            .serve(
                &router_endpoint(namespace, "best_worker_id"),
                id,
                Arc::new(Best { pool: pool.clone() }),
                meta,
            )
            .await?;
        Ok(Self {
            pool,
            generate,
            best_worker_id,
        })
    }
}
