//! Compositions: a frontend over a worker endpoint (any runtime), a frontend
//! over external engines (`--engine`), and the embedded all-in-one `serve` —
//! frontend, KV router and N mock workers in one process over in-memory
//! discovery and events, requests on loopback TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvrouter_core::busy::LoadThresholds;
use kvrouter_core::{KvRouterConfig, RouterMode};
use kvrouter_engines::EngineMetrics;
use kvrouter_mocker::engine::EngineConfig;
use kvrouter_mocker::service::{self, MockWorker, WorkerConfig};
use kvrouter_router::disagg::PrefillClient;
use kvrouter_router::engines::{EnginePool, EnginePoolConfig};
use kvrouter_router::{KvRouter, RouterMetrics, WorkerPool};
use kvrouter_runtime::endpoint::{EndpointId, InstanceId};
use kvrouter_runtime::node::{Node, new_instance_id};
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

/// Everything `kvrouter serve` runs.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Model name served.
    pub model_name: String,
    /// Mock workers to start.
    pub workers: u32,
    /// Their engine.
    pub engine: EngineConfig,
    /// Data-parallel ranks per worker.
    pub data_parallel_size: u32,
    /// Routing.
    pub routing: RoutingConfig,
    /// Endpoints served and the HTTP server's limits.
    pub http: HttpOptions,
    /// Namespace of the workers' endpoint.
    pub namespace: String,
    /// Chance a mock token ends its request.
    pub eos_probability: f64,
}

/// The embedded deployment.
pub struct Embedded {
    /// The frontend.
    pub frontend: FrontendHandle,
    node: Node,
    endpoint: EndpointId,
    worker_config: WorkerConfig,
    workers: Vec<MockWorker>,
}

impl Embedded {
    /// Starts frontend, router and workers; returns once every worker is routable.
    pub async fn start(
        cfg: EmbeddedConfig,
        pre: Arc<Preprocessor>,
        listener: TcpListener,
    ) -> Result<Self, String> {
        let node = Node::in_process();
        let endpoint = EndpointId {
            namespace: cfg.namespace.clone(),
            component: "backend".into(),
            endpoint: "generate".into(),
        };
        let frontend = start_frontend(
            node.clone(),
            endpoint.clone(),
            cfg.model_name.clone(),
            pre.clone(),
            cfg.routing.clone(),
            cfg.http,
            listener,
        )
        .await?;
        let worker_config = WorkerConfig {
            engine: cfg.engine,
            data_parallel_size: cfg.data_parallel_size,
            model_name: cfg.model_name.clone(),
            vocab: pre.ordinary_tokens(),
            eos_probability: cfg.eos_probability,
            context_length: pre.context_length(),
            durable_kv_events: false,
            role: Default::default(),
            zmq_events: None,
        };
        let mut me = Self {
            frontend,
            node,
            endpoint,
            worker_config,
            workers: Vec::new(),
        };
        for _ in 0..cfg.workers {
            me.add_worker().await?;
        }
        let pool = me
            .frontend
            .frontend
            .pool()
            .expect("serve routes to its own workers")
            .clone();
        if !pool
            .wait_for_workers(cfg.workers as usize, Duration::from_secs(10))
            .await
        {
            return Err("the mock workers did not register within 10 s".into());
        }
        Ok(me)
    }

    /// Starts one more mock worker; returns its id.
    pub async fn add_worker(&mut self) -> Result<InstanceId, String> {
        let id = new_instance_id();
        let w = service::start(&self.node, &self.endpoint, id, self.worker_config.clone())
            .await
            .map_err(|e| e.to_string())?;
        self.workers.push(w);
        Ok(id)
    }

    /// Stops a mock worker (it deregisters); `false` if unknown.
    pub fn remove_worker(&mut self, id: InstanceId) -> bool {
        let before = self.workers.len();
        self.workers.retain(|w| w.id() != id);
        before != self.workers.len()
    }

    /// Ids of the running mock workers.
    pub fn worker_ids(&self) -> Vec<InstanceId> {
        self.workers.iter().map(|w| w.id()).collect()
    }

    /// Stops everything: the HTTP side drains first, while the workers still
    /// serve the requests in flight; then the workers stop (and deregister).
    pub async fn shutdown(self) -> std::io::Result<()> {
        let r = self.frontend.shutdown().await;
        drop(self.workers);
        r
    }
}
