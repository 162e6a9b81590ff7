//! External engines behind the KV router: vLLM, SGLang, `trtllm-serve` or
//! any OpenAI-compatible server, named by `--engine`.
//!
//! At start the pool asks each engine its model (engines that disagree are a
//! start-up error naming them) and, when the operator gave no `kv-events=`,
//! its KV-event ports. Each rank's ZeroMQ stream feeds the router through a
//! [`KvEventSource`] whose handle the pool keeps. One task per engine probes
//! `GET /health` (an unhealthy engine leaves routing until it answers again)
//! and scrapes `/metrics` for the engine's own load, which busy detection
//! uses beside the router's tracking. [`EnginePool::forward`] routes a request
//! by its tokens, forwards the client's body unchanged and returns the
//! engine's answer as a stream that keeps the router's model of the request
//! current ([`passthrough`](crate::passthrough)); an engine that refuses the
//! connection before any byte is sent is marked down and the request goes to
//! another one. The caches of engines that publish no events are predicted
//! from the router's own decisions: by the approximate index when no engine
//! publishes, per engine ([`predicted`](crate::predicted)) beside engines that do.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kvrouter_core::protocols::ActiveLoad;
use kvrouter_core::{RouterConfigOverride, WorkerKey};
use kvrouter_engines::metrics::EngineMetrics;
use kvrouter_engines::probe::{Probe, RankEvents};
use kvrouter_engines::upstream::{ForwardRequest, HttpUpstream, Upstream};
use kvrouter_engines::{EngineSpec, KvEventSink, KvEventSource, UpstreamError, ZmqSourceConfig};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod discover;

pub use discover::Discovered;

use crate::passthrough::Passthrough;
use crate::predicted::Predicted;
use crate::router::{KvRouter, RouteError, RouteQuery};

/// How the pool follows its engines.
#[derive(Debug, Clone)]
pub struct EnginePoolConfig {
    /// The engines.
    pub specs: Vec<EngineSpec>,
    /// The model clients ask for; `None` takes the engines' own.
    pub model_name: Option<String>,
    /// Between health probes.
    pub health_interval: Duration,
    /// Between `/metrics` scrapes.
    pub load_interval: Duration,
    /// How long start-up waits for every engine to answer `/v1/models`.
    pub startup_timeout: Duration,
    /// Longest wait for an engine's response headers.
    pub first_byte_timeout: Duration,
    /// Each step of a KV-event replay.
    pub replay_timeout: Duration,
}

impl EnginePoolConfig {
    /// The documented defaults for `specs`.
    pub fn new(specs: Vec<EngineSpec>) -> Self {
        Self {
            specs,
            model_name: None,
            health_interval: Duration::from_secs(1),
            load_interval: Duration::from_secs(1),
            startup_timeout: Duration::from_secs(30),
            first_byte_timeout: Duration::from_secs(600),
            replay_timeout: Duration::from_secs(2),
        }
    }
}

/// Why an engine request failed before an answer could be streamed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ForwardError {
    /// Routing refused it.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The engine failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// One engine as the pool sees it (`/health`, `/router/state`).
#[derive(Debug, Clone, Serialize)]
pub struct EngineInfo {
    /// Its worker id in the router.
    pub worker_id: u64,
    /// Its OpenAI server.
    pub url: String,
    /// Data-parallel ranks.
    pub dp_size: u32,
    /// Answering its health probe.
    pub healthy: bool,
    /// Per rank, the KV-event PUB followed (empty: approximate routing).
    pub kv_events: Vec<String>,
}

pub(crate) struct Engine {
    pub(crate) id: u64,
    base: String,
    dp_size: u32,
    upstream: HttpUpstream,
    probe: Probe,
    healthy: AtomicBool,
    events: Vec<RankEvents>,
    sources: Mutex<Vec<KvEventSource>>,
    total_kv_blocks: AtomicU64,
    completed: AtomicU64,
    silent_reported: AtomicBool,
    metrics: EngineMetrics,
}

/// Requests completed without a single KV event before the engine is reported silent.
const SILENT_AFTER: u64 = 20;

impl Engine {
    pub(crate) fn mark_down(&self, why: &str) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(engine = %self.base, reason = why, "engine taken out of routing until its health probe passes");
            self.metrics
                .healthy
                .with_label_values(&[&self.id.to_string(), &self.base])
                .set(0);
        }
    }

    /// After a completed request: an engine that was told to publish events
    /// but never has is misconfigured (`spec/engines.md` §1.7).
    pub(crate) fn completed(&self) {
        let n = self.completed.fetch_add(1, Ordering::Relaxed) + 1;
        if n < SILENT_AFTER
            || self.events.is_empty()
            || self.silent_reported.load(Ordering::Relaxed)
        {
            return;
        }
        let received: u64 = self
            .sources
            .lock()
            .iter()
            .map(|s| s.status().batches.load(Ordering::Relaxed))
            .sum();
        if received == 0 && !self.silent_reported.swap(true, Ordering::Relaxed) {
            tracing::error!(
                engine = %self.base, completed = n, endpoints = ?self.events.iter().map(|e| &e.endpoint).collect::<Vec<_>>(),
                "no KV events from this engine after {n} completed requests: check its \
                 --kv-events-config (enable_kv_cache_events: true, publisher: zmq, the endpoint \
                 bound with a wildcard host) and that prefix caching is on; its cache is invisible \
                 to the router until events arrive"
            );
        }
    }

    fn info(&self) -> EngineInfo {
        EngineInfo {
            worker_id: self.id,
            url: self.base.clone(),
            dp_size: self.dp_size,
            healthy: self.healthy.load(Ordering::Relaxed),
            kv_events: self.events.iter().map(|e| e.endpoint.clone()).collect(),
        }
    }
}

/// External engines and the router that picks among them.
pub struct EnginePool {
    router: Arc<KvRouter>,
    engines: BTreeMap<u64, Arc<Engine>>,
    model: String,
    metrics: EngineMetrics,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Predicted caches of the engines that publish no events.
    predicted: Option<Arc<Predicted>>,
}

/// A stable worker id for an engine URL (the same across router restarts).
fn engine_id(base: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(base.as_bytes()) >> 1
}

impl EnginePool {
    fn subscribe(&self, replay_timeout: Duration) {
        if !self.router.config().use_kv_events {
            return;
        }
        let sink: Arc<dyn KvEventSink> = self.router.clone();
        for e in self.engines.values() {
            let mut sources = e.sources.lock();
            for ev in &e.events {
                sources.push(KvEventSource::spawn_zmq(
                    ZmqSourceConfig {
                        key: WorkerKey::new(e.id, ev.rank),
                        endpoint: ev.endpoint.clone(),
                        replay_endpoint: ev.replay.clone(),
                        topic: ev.topic.clone(),
                        block_size: self.router.block_size(),
                        replay_timeout,
                    },
                    sink.clone(),
                    self.metrics.clone(),
                    self.cancel.child_token(),
                ));
            }
        }
    }

    /// The router.
    pub fn router(&self) -> &Arc<KvRouter> {
        &self.router
    }

    /// The model the engines serve.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The engines, as the pool sees them.
    pub fn engines(&self) -> Vec<EngineInfo> {
        self.engines.values().map(|e| e.info()).collect()
    }

    /// Routes a request by `tokens` and forwards `req` to the chosen engine;
    /// an engine unreachable before anything was sent is taken out of
    /// routing and the next one tried.
    pub async fn forward(
        &self,
        tokens: &[u32],
        config_override: Option<&RouterConfigOverride>,
        request_id: &str,
        dp_rank: Option<u32>,
        jump: std::time::Duration,
        mut req: ForwardRequest,
    ) -> Result<Passthrough, ForwardError> {
        let mut exclude: Vec<u64> = Vec::new();
        // Held here while every engine is saturated (the router queue).
        let mut turn = Some(self.router.turn(tokens.len(), jump).await);
        loop {
            let down: Vec<u64> = self
                .engines
                .values()
                .filter(|e| !e.healthy.load(Ordering::Relaxed) && !exclude.contains(&e.id))
                .map(|e| e.id)
                .collect();
            exclude.extend(down);
            let routing = self.router.select(&RouteQuery {
                tokens,
                config_override,
                dp_rank,
                worker_id: None,
                exclude: &exclude,
            })?;
            let engine = self.engines[&routing.worker.worker_id].clone();
            let active = self.router.begin(request_id, &routing, None);
            drop(turn.take());
            if let Some(p) = self.predicted.as_ref().filter(|_| engine.events.is_empty()) {
                p.routed(
                    &self.router,
                    routing.worker,
                    routing.blocks(),
                    std::time::Instant::now(),
                );
            }
            req.dp_rank = (engine.dp_size > 1).then_some(routing.worker.dp_rank);
            let labels = [engine.id.to_string()];
            match engine.upstream.forward(req.clone()).await {
                Ok(resp) => {
                    let outcome = match resp.status {
                        200..=399 => "ok",
                        400..=499 => "client_error",
                        _ => "server_error",
                    };
                    self.metrics
                        .upstream
                        .with_label_values(&[&labels[0], outcome])
                        .inc();
                    return Ok(Passthrough::new(
                        resp,
                        active,
                        engine,
                        routing.overlap_blocks,
                    ));
                }
                Err(e) => {
                    let outcome = if e.retryable { "unreachable" } else { "failed" };
                    self.metrics
                        .upstream
                        .with_label_values(&[&labels[0], outcome])
                        .inc();
                    drop(active);
                    engine.mark_down(&e.message);
                    if !e.retryable || exclude.len() + 1 >= self.engines.len() {
                        return Err(e.into());
                    }
                    tracing::warn!(engine = %engine.base, error = %e, "engine unreachable; routing the request again");
                    exclude.push(engine.id);
                }
            }
        }
    }
}

impl Drop for EnginePool {
    fn drop(&mut self) {
        self.cancel.cancel();
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}

/// Probes one engine's health and load until cancelled.
async fn follow(
    e: Arc<Engine>,
    router: Arc<KvRouter>,
    health_every: Duration,
    load_every: Duration,
    cancel: CancellationToken,
) {
    let mut health = tokio::time::interval(health_every);
    let mut load = tokio::time::interval(load_every);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    load.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let id = e.id.to_string();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = health.tick() => {
                let ok = e.probe.healthy().await;
                if ok != e.healthy.swap(ok, Ordering::Relaxed) {
                    if ok {
                        tracing::info!(engine = %e.base, "engine healthy: back in routing");
                    } else {
                        tracing::warn!(engine = %e.base, "engine failed its health probe: out of routing");
                    }
                }
                e.metrics.healthy.with_label_values(&[&id, &e.base]).set(i64::from(ok));
            }
            _ = load.tick() => {
                let scrape = e.probe.scrape().await;
                if let Some(n) = scrape.num_gpu_blocks {
                    e.total_kv_blocks.store(n, Ordering::Relaxed);
                }
                let total = e.total_kv_blocks.load(Ordering::Relaxed);
                for (rank, l) in scrape.ranks {
                    let g = |s: &str, v: f64| e.metrics.scraped.with_label_values(&[&id, s]).set(v as i64);
                    if let Some(v) = l.running { g("running", v); }
                    if let Some(v) = l.waiting { g("waiting", v); }
                    if let Some(v) = l.kv_usage { g("kv_usage_perc", v * 1000.0); }
                    router.observe_load(&ActiveLoad {
                        worker_id: e.id,
                        dp_rank: rank,
                        active_decode_blocks: None,
                        active_prefill_tokens: None,
                        kv_used_blocks: l.kv_usage.filter(|_| total > 0).map(|u| (u * total as f64) as u64),
                    });
                }
            }
        }
    }
}
