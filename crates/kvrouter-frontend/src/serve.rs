//! Compositions: a frontend over a worker endpoint (any runtime) and a
//! frontend over external engines (`--engine`). The embedded all-in-one
//! `serve`, with mock workers, is composed in the `kvrouter-serve` crate.

use std::net::SocketAddr;
use std::sync::Arc;

use kvrouter_core::busy::LoadThresholds;
use kvrouter_core::{KvRouterConfig, RouterMode};
use kvrouter_engines::EngineMetrics;
use kvrouter_router::disagg::PrefillClient;
use kvrouter_router::engines::{EnginePool, EnginePoolConfig};
use kvrouter_router::{KvRouter, RouterMetrics, WorkerPool};
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::node::Node;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::{Backend, Frontend, HttpOptions, app};
use crate::server::serve;
use crate::tokenizer::Preprocessor;

/// How the frontend routes.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    /// Policy.
    pub mode: RouterMode,
    /// KV router knobs.
    pub kv: KvRouterConfig,
    /// Busy thresholds.
    pub thresholds: LoadThresholds,
    /// KV block size in tokens (must equal the workers').
    pub block_size: u32,
    /// Disaggregated serving: the prefill pool's router.
    pub prefill_endpoint: Option<EndpointId>,
    /// Fail requests (503) instead of serving them aggregated when the prefill pool is down.
    pub enforce_disagg: bool,
    /// Times a stream whose worker fails may move to another (`--migration-limit`).
    pub migration_limit: u32,
}

/// A running frontend.
pub struct FrontendHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state.
    pub frontend: Arc<Frontend>,
    /// Stops the routing side (worker pool, engine probes and event sources).
    cancel: CancellationToken,
    /// Stops the HTTP server (which then drains).
    stop: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
}

impl FrontendHandle {
    /// Stops serving: no new connection is accepted, in-flight requests get the
    /// grace period (then end with an error), and only then does routing stop,
    /// so the requests that drain still have their workers.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.stop.cancel();
        let r = self.server.await.unwrap_or(Ok(()));
        self.cancel.cancel();
        r
    }

    /// Resolves when the server stops by itself (an I/O failure).
    pub async fn wait(&mut self) -> std::io::Result<()> {
        (&mut self.server).await.unwrap_or(Ok(()))
    }
}

/// Starts a frontend for `model` over the workers of `endpoint`.
pub async fn start_frontend(
    node: Node,
    endpoint: EndpointId,
    model: String,
    pre: Arc<Preprocessor>,
    routing: RoutingConfig,
    http: HttpOptions,
    listener: TcpListener,
) -> Result<FrontendHandle, String> {
    let registry = Registry::new();
    let metrics = RouterMetrics::new(&registry).map_err(|e| e.to_string())?;
    let router = KvRouter::new(
        routing.mode,
        routing.kv,
        routing.block_size,
        routing.thresholds,
        metrics,
    );
    let cancel = CancellationToken::new();
    let prefill = routing
        .prefill_endpoint
        .map(|e| (PrefillClient::new(node.clone(), e), routing.enforce_disagg));
    let pool = WorkerPool::start(node, endpoint, router, cancel.child_token()).await?;
    pool.set_migration_limit(routing.migration_limit);
    let frontend = Frontend::new(model, pre, Backend::Workers(pool), registry, prefill)
        .map_err(|e| e.to_string())?;
    listen(frontend, http, listener, cancel)
}

/// Serves `frontend` on `listener` until the handle shuts it down.
fn listen(
    frontend: Arc<Frontend>,
    http: HttpOptions,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<FrontendHandle, String> {
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        app(frontend.clone(), http),
        http.limits,
        stop.clone().cancelled_owned(),
        frontend.cut.clone(),
    ));
    Ok(FrontendHandle {
        addr,
        frontend,
        cancel,
        stop,
        server,
    })
}

/// Block size assumed for engines that neither report one nor are given one
/// (vLLM's default).
pub const DEFAULT_ENGINE_BLOCK_SIZE: u32 = 16;

/// Starts a frontend over external engines (`--engine`): asks them their
/// model, block size and event ports, then routes and forwards to them.
/// Without events from any engine, KV routing is approximate.
pub async fn start_engine_frontend(
    engines: EnginePoolConfig,
    pre: Arc<Preprocessor>,
    routing: RoutingConfig,
    block_size: Option<u32>,
    http: HttpOptions,
    listener: TcpListener,
) -> Result<FrontendHandle, String> {
    let registry = Registry::new();
    let metrics = RouterMetrics::new(&registry).map_err(|e| e.to_string())?;
    let engine_metrics = EngineMetrics::new(&registry).map_err(|e| e.to_string())?;
    let found = EnginePool::discover(engines).await?;
    let block_size = block_size
        .or_else(|| found.block_size())
        .unwrap_or(DEFAULT_ENGINE_BLOCK_SIZE);
    let mut kv = routing.kv;
    if routing.mode.kv_aware() && kv.use_kv_events && !found.publishes_events() {
        tracing::warn!(
            "no engine publishes KV events: routing approximately (caches predicted from the router's own decisions)"
        );
        kv.use_kv_events = false;
    }
    let router = KvRouter::new(routing.mode, kv, block_size, routing.thresholds, metrics);
    let cancel = CancellationToken::new();
    let model = found.model().to_string();
    let pool = found.start(router, engine_metrics, cancel.child_token());
    let frontend = Frontend::new(model, pre, Backend::Engines(pool), registry, None)
        .map_err(|e| e.to_string())?;
    listen(frontend, http, listener, cancel)
}
