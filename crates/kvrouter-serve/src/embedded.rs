//! The embedded all-in-one `serve`: frontend, KV router and N mock workers in
//! one process over in-memory discovery and events, requests on loopback TCP.
//! Workers can be added and removed while it runs (`/workers` admin, tests).

use std::sync::Arc;
use std::time::Duration;

use kvrouter_frontend::app::HttpOptions;
use kvrouter_frontend::serve::{FrontendHandle, RoutingConfig, start_frontend};
use kvrouter_frontend::tokenizer::Preprocessor;
use kvrouter_mocker::engine::EngineConfig;
use kvrouter_mocker::service::{self, MockWorker, WorkerConfig};
use kvrouter_runtime::endpoint::{EndpointId, InstanceId};
use kvrouter_runtime::node::{Node, new_instance_id};
use tokio::net::TcpListener;

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
    /// A testing aid: the tokens every answer is made of.
    pub script: Option<Vec<u32>>,
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
            script: cfg.script.clone().map(Arc::new),
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
