//! A stand-in vLLM server (`kvrouter mocker --openai-port`): one mock
//! worker behind its own OpenAI frontend, publishing vLLM-format KV events on
//! ZeroMQ with a replay buffer, its load under `vllm:` metric names, and its
//! event ports at `/kv_event_sources`. Anyone can try a real-engine
//! deployment of kvrouter without a GPU, and the tests drive exactly the
//! adapter path a vLLM fleet takes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvrouter_core::busy::LoadThresholds;
use kvrouter_core::{KvRouterConfig, RouterMode};
use kvrouter_mocker::service::{self, MockWorker, WorkerConfig};
use kvrouter_mocker::vllm::{prometheus_text, sources_json};
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::node::{Node, new_instance_id};
use tokio::net::TcpListener;

use kvrouter_frontend::app::{EngineFacade, HttpOptions};
use kvrouter_frontend::serve::{FrontendHandle, RoutingConfig, start_frontend};
use kvrouter_frontend::server::HttpLimits;
use kvrouter_frontend::tokenizer::Preprocessor;

/// A running stand-in engine; dropping it stops the worker (its sockets close).
pub struct StandIn {
    /// Its OpenAI server.
    pub frontend: FrontendHandle,
    worker: Option<MockWorker>,
}

impl StandIn {
    /// Starts the worker (`cfg.zmq_events` says where its events go) and its
    /// OpenAI server on `listener`; on shutdown requests in flight may run
    /// for `graceful_timeout`.
    pub async fn start(
        cfg: WorkerConfig,
        pre: Arc<Preprocessor>,
        listener: TcpListener,
        graceful_timeout: Duration,
    ) -> Result<Self, String> {
        let node = Node::in_process();
        let endpoint = EndpointId {
            namespace: "standin".into(),
            component: "backend".into(),
            endpoint: "generate".into(),
        };
        let block_size = cfg.engine.block_size as u32;
        let frontend = start_frontend(
            node.clone(),
            endpoint.clone(),
            cfg.model_name.clone(),
            pre,
            RoutingConfig {
                // One worker: its ranks are chosen by the rank header or in turn.
                mode: RouterMode::RoundRobin,
                kv: KvRouterConfig {
                    use_kv_events: false,
                    ..KvRouterConfig::default()
                },
                thresholds: LoadThresholds::default(),
                block_size,
                prefill_endpoint: None,
                enforce_disagg: false,
                migration_limit: 0,
            },
            HttpOptions {
                limits: HttpLimits {
                    graceful_timeout,
                    ..HttpLimits::default()
                },
                ..HttpOptions::default()
            },
            listener,
        )
        .await?;
        let model = cfg.model_name.clone();
        let worker = service::start(&node, &endpoint, new_instance_id(), cfg)
            .await
            .map_err(|e| e.to_string())?;
        let sources = sources_json(worker.zmq_addresses());
        let stats = worker.stats().to_vec();
        frontend.frontend.set_engine_facade(EngineFacade {
            metrics: Arc::new(move || prometheus_text(&model, block_size as usize, &stats)),
            kv_event_sources: sources,
        });
        if !frontend
            .frontend
            .pool()
            .expect("the stand-in routes to its own worker")
            .wait_for_workers(1, Duration::from_secs(10))
            .await
        {
            return Err("the stand-in's worker did not register".into());
        }
        Ok(Self {
            frontend,
            worker: Some(worker),
        })
    }

    /// Where its OpenAI server listens.
    pub fn addr(&self) -> SocketAddr {
        self.frontend.addr
    }

    /// Each rank's bound ZeroMQ PUB and replay addresses.
    pub fn zmq_addresses(&self) -> &[(String, Option<String>)] {
        self.worker.as_ref().map_or(&[], |w| w.zmq_addresses())
    }

    /// Stops it as an engine stops: the HTTP server refuses new requests and
    /// drains (up to the graceful timeout), then the worker and its ZeroMQ
    /// sockets go.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        let r = self.frontend.shutdown().await;
        drop(self.worker.take());
        r
    }
}
