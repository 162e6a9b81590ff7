//! `kvrouter engine`: an external engine (vLLM, SGLang, …) made a worker of
//! a distributed deployment. The sidecar runs beside the engine, registers it
//! in discovery under a lease, serves tokenized requests on the request plane
//! by forwarding them to the engine's `/v1/completions` with the token ids as
//! the prompt ([`TokenUpstream`]), and republishes the engine's ZeroMQ KV
//! events and scraped load on the event plane as the `RouterEvent` /
//! `ActiveLoad` JSON that kvrouter's own workers publish. Like those workers
//! it keeps a log of what it published and answers routers' recovery queries
//! (`worker_kv_indexer_query`), so a router that lost events or restarted
//! rebuilds the engine's blocks from the sidecar.
//!
//! Why republish rather than have each router subscribe to the engine's
//! ZeroMQ: every router kind (frontends, standalone routers, the pool routers
//! behind a global router, their replicas, durable JetStream consumers)
//! already follows that subject, with no new code and no router needing a
//! route to every engine's ZeroMQ ports; the engine's stream is decoded,
//! gap-checked and replayed once, next to the engine, instead of once per
//! router; and durable mode (JetStream, snapshots) covers engines for free.
//! The cost is one hop (measured in `docs/engines.md`). An engine that fails
//! its health probe is deregistered until it passes again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use kvrouter_core::llm::PreprocessedRequest;
use std::collections::HashMap;

use kvrouter_core::protocols::{ActiveLoad, DpRank, KvCacheEvent, KvCacheEventData};
use kvrouter_core::recovery::{KvQueryReply, LocalLog, answer_query};
use kvrouter_core::{RouterEvent, WorkerKey};
use kvrouter_engines::probe::{Probe, RankEvents};
use kvrouter_engines::spec::rank_endpoint;
use kvrouter_engines::tokens::TokenUpstream;
use kvrouter_engines::{EngineMetrics, EngineSpec, KvEventSink, KvEventSource, ZmqSourceConfig};
use kvrouter_runtime::endpoint::{EndpointId, InstanceId, WorkerMetadata};
use kvrouter_runtime::node::{Node, Served};
use kvrouter_runtime::request::Handler;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use kvrouter_runtime::subjects::{
    kv_events as kv_events_subject, kv_metrics as kv_metrics_subject,
};

/// What the sidecar registers and follows.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// The engine.
    pub spec: EngineSpec,
    /// The worker endpoint it serves (`ns.backend.generate`).
    pub endpoint: EndpointId,
    /// The model clients ask for; `None` takes the engine's.
    pub model_name: Option<String>,
    /// Tokens per block; `None` takes the engine's (`/metrics`), else 16.
    pub block_size: Option<u32>,
    /// How long start-up waits for the engine to answer.
    pub startup_timeout: Duration,
}

/// A running sidecar; dropping it deregisters and stops following.
pub struct Sidecar {
    /// The instance id registered.
    pub id: InstanceId,
    /// The model served.
    pub model: String,
    /// KV-event endpoints followed, per rank.
    pub events: Vec<String>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    _sources: Vec<KvEventSource>,
    _query: Served,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.cancel.cancel();
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

/// Serves tokenized requests by forwarding them to the engine.
struct EngineHandler {
    upstream: TokenUpstream,
    dp_size: u32,
}

impl Handler for EngineHandler {
    fn handle(
        &self,
        request: Bytes,
        cancel: CancellationToken,
    ) -> BoxStream<'static, Result<Bytes, String>> {
        let req: PreprocessedRequest = match serde_json::from_slice(&request) {
            Ok(r) => r,
            Err(e) => {
                let msg =
                    kvrouter_core::error::UpstreamError::invalid(format!("invalid request: {e}"))
                        .to_wire();
                return futures::stream::once(async move { Err(msg) }).boxed();
            }
        };
        let upstream = self.upstream.clone();
        let rank = (self.dp_size > 1).then(|| req.dp_rank().unwrap_or(0));
        let started = async move { upstream.generate(&req, rank).await };
        futures::stream::once(started)
            .flat_map(move |r| match r {
                Err(e) => futures::stream::once(async move { Err(e.to_wire()) }).boxed(),
                Ok(s) => s
                    .map(|o| match o {
                        Ok(out) => Ok(Bytes::from(
                            serde_json::to_vec(&out).expect("outputs serialize"),
                        )),
                        Err(e) => Err(e.to_wire()),
                    })
                    .boxed(),
            })
            .take_until(cancel.cancelled_owned())
            .boxed()
    }
}

/// Puts an engine's events on the event plane as `RouterEvent` JSON, in
/// order, from one publishing task ([`PlaneSink::spawn`]). Each rank's events
/// are also kept in a [`LocalLog`], so routers that lose some ask the sidecar
/// for them ([`PlaneSink::query_handler`]), as they ask kvrouter's own workers.
pub struct PlaneSink {
    tx: mpsc::UnboundedSender<Bytes>,
    logs: Mutex<HashMap<DpRank, LocalLog>>,
}

impl PlaneSink {
    /// A sink publishing on `subject` of `plane` until `cancel`; the task's handle is returned.
    pub fn spawn(
        plane: Arc<dyn kvrouter_runtime::events::EventPlane>,
        subject: String,
        cancel: CancellationToken,
    ) -> (Arc<Self>, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        let task = tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = cancel.cancelled() => return,
                    m = rx.recv() => match m { Some(m) => m, None => return },
                };
                if let Err(e) = plane.publish(&subject, msg).await {
                    tracing::warn!(error = %e, "KV event not republished");
                }
            }
        });
        let sink = Self {
            tx,
            logs: Mutex::default(),
        };
        (Arc::new(sink), task)
    }

    /// Answers routers' recovery queries from the ranks' logs.
    pub fn query_handler(self: &Arc<Self>) -> Arc<dyn Handler> {
        Arc::new(SinkQueries(self.clone()))
    }
}

impl KvEventSink for PlaneSink {
    fn apply_event(&self, ev: RouterEvent) {
        self.logs
            .lock()
            .entry(ev.event.dp_rank)
            .or_insert_with(|| LocalLog::new(ev.worker_id, ev.event.dp_rank))
            .record(&ev.event);
        let _ = self.tx.send(Bytes::from(
            serde_json::to_vec(&ev).expect("events serialize"),
        ));
    }

    /// Routers clear the whole worker on `cleared` (all its ranks): for a
    /// multi-rank engine that forgets the other ranks too, which costs hits,
    /// never a wrong match. The event repeats the rank's last id, so routers
    /// following the ids see no gap.
    fn reset_rank(&self, key: WorkerKey) {
        let last = self
            .logs
            .lock()
            .get(&key.dp_rank)
            .and_then(LocalLog::last_event_id);
        self.apply_event(RouterEvent::new(
            key.worker_id,
            KvCacheEvent {
                event_id: last.unwrap_or(0),
                data: KvCacheEventData::Cleared,
                dp_rank: key.dp_rank,
            },
        ));
    }
}

struct SinkQueries(Arc<PlaneSink>);

impl Handler for SinkQueries {
    fn handle(
        &self,
        request: Bytes,
        _cancel: CancellationToken,
    ) -> BoxStream<'static, Result<Bytes, String>> {
        let reply = answer_query(&request, |rank, start| {
            // A rank that published nothing yet has an empty log.
            Some(self.0.logs.lock().get(&rank).map_or(
                KvQueryReply::Dump {
                    last_event_id: None,
                    events: Vec::new(),
                },
                |l| l.answer(start),
            ))
        })
        .map(Bytes::from)
        .map_err(|e| e.to_wire());
        futures::stream::once(async move { reply }).boxed()
    }
}

impl Sidecar {
    /// Leaves discovery (awaited) before the sidecar stops, so routers stop
    /// sending to the engine at once.
    pub async fn deregister(mut self) {
        self._query.deregister().await;
        // The engine's own registration lives in the follow task: stopping it drops it.
        self.cancel.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }

    /// Asks the engine its model, geometry and event ports, registers it as
    /// instance `id` of `cfg.endpoint`, and starts following it.
    pub async fn start(node: Node, cfg: SidecarConfig, id: InstanceId) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| e.to_string())?;
        let base = cfg.spec.base();
        let probe = Probe::new(client.clone(), &base, Duration::from_secs(5));
        let deadline = tokio::time::Instant::now() + cfg.startup_timeout;
        let models = loop {
            match probe.models().await {
                Ok(m) => break m,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("the engine did not answer: {e}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        };
        let model = match &cfg.model_name {
            Some(want) if !models.contains(want) => {
                return Err(format!(
                    "--model-name {want} but {base} serves {}",
                    models.join(", ")
                ));
            }
            Some(want) => want.clone(),
            None => models[0].clone(),
        };
        let events: Vec<RankEvents> = match &cfg.spec.kv_events {
            Some(ep) => (0..cfg.spec.dp_size)
                .map(|r| RankEvents {
                    rank: r,
                    endpoint: rank_endpoint(ep, r),
                    replay: cfg.spec.replay.as_deref().map(|p| rank_endpoint(p, r)),
                    topic: String::new(),
                })
                .collect(),
            None => probe.event_sources().await,
        };
        let scrape = probe.scrape().await;
        let block_size = cfg.block_size.or(scrape.block_size).unwrap_or(16);
        if let Some(bs) = scrape.block_size
            && bs != block_size
        {
            return Err(format!(
                "--block-size {block_size} but the engine reports blocks of {bs} tokens"
            ));
        }
        let dp_size = cfg.spec.dp_size.max(events.len() as u32);
        let meta = WorkerMetadata {
            model_name: model.clone(),
            block_size,
            total_kv_blocks: scrape.num_gpu_blocks.unwrap_or(0),
            max_num_seqs: 0,
            max_num_batched_tokens: 0,
            data_parallel_size: dp_size,
            enable_local_indexer: true,
        };
        let mut metadata = serde_json::to_value(&meta).expect("metadata serializes");
        metadata["engine_url"] = serde_json::json!(base);
        let handler = Arc::new(EngineHandler {
            upstream: TokenUpstream::new(client, &base, &model, Duration::from_secs(600)),
            dp_size,
        });
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();
        // One publishing task keeps each event in order.
        let (sink, task) = PlaneSink::spawn(
            node.events.clone(),
            kv_events_subject(&cfg.endpoint),
            cancel.clone(),
        );
        tasks.push(task);
        // The query endpoint first: a router that sees the engine can ask at once.
        let query = node
            .serve(
                &kvrouter_runtime::subjects::kv_query_endpoint(&cfg.endpoint),
                id,
                sink.query_handler(),
                serde_json::json!({}),
            )
            .await
            .map_err(|e| e.to_string())?;
        let served = node
            .serve(&cfg.endpoint, id, handler.clone(), metadata.clone())
            .await
            .map_err(|e| e.to_string())?;
        let sink: Arc<dyn KvEventSink> = sink;
        let metrics = EngineMetrics::unregistered();
        let sources = events
            .iter()
            .map(|ev| {
                KvEventSource::spawn_zmq(
                    ZmqSourceConfig {
                        key: WorkerKey::new(id, ev.rank),
                        endpoint: ev.endpoint.clone(),
                        replay_endpoint: ev.replay.clone(),
                        topic: ev.topic.clone(),
                        block_size: block_size as usize,
                        replay_timeout: Duration::from_secs(2),
                    },
                    sink.clone(),
                    metrics.clone(),
                    cancel.child_token(),
                )
            })
            .collect();
        tasks.push(tokio::spawn(follow(FollowCtx {
            node,
            endpoint: cfg.endpoint.clone(),
            id,
            probe,
            handler,
            metadata,
            served: Some(served),
            total: scrape.num_gpu_blocks.unwrap_or(0),
            cancel: cancel.clone(),
        })));
        Ok(Self {
            id,
            model,
            events: events.iter().map(|e| e.endpoint.clone()).collect(),
            cancel,
            tasks,
            _sources: sources,
            _query: query,
        })
    }
}

struct FollowCtx {
    node: Node,
    endpoint: EndpointId,
    id: InstanceId,
    probe: Probe,
    handler: Arc<EngineHandler>,
    metadata: serde_json::Value,
    served: Option<Served>,
    total: u64,
    cancel: CancellationToken,
}

/// Every second: health (deregister while failing) and load (published).
async fn follow(mut f: FollowCtx) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let load_subject = kv_metrics_subject(&f.endpoint.namespace);
    loop {
        tokio::select! {
            _ = f.cancel.cancelled() => {
                // Stopping: leave discovery before the process goes.
                if let Some(s) = f.served.as_mut() {
                    s.deregister().await;
                }
                return;
            }
            _ = tick.tick() => {}
        }
        let healthy = f.probe.healthy().await;
        match (healthy, f.served.is_some()) {
            (false, true) => {
                tracing::warn!(
                    engine = f.id,
                    "engine failed its health probe: deregistered"
                );
                f.served = None;
            }
            (true, false) => {
                match f
                    .node
                    .serve(&f.endpoint, f.id, f.handler.clone(), f.metadata.clone())
                    .await
                {
                    Ok(s) => {
                        tracing::info!(engine = f.id, "engine healthy: registered again");
                        f.served = Some(s);
                    }
                    Err(e) => tracing::warn!(error = %e, "re-registration failed; retrying"),
                }
            }
            _ => {}
        }
        if !healthy {
            continue;
        }
        let scrape = f.probe.scrape().await;
        let total = scrape.num_gpu_blocks.unwrap_or(f.total);
        for (rank, l) in scrape.ranks {
            let load = ActiveLoad {
                worker_id: f.id,
                dp_rank: rank,
                active_decode_blocks: None,
                active_prefill_tokens: None,
                kv_used_blocks: l
                    .kv_usage
                    .filter(|_| total > 0)
                    .map(|u| (u * total as f64) as u64),
            };
            let bytes = Bytes::from(serde_json::to_vec(&load).expect("load serializes"));
            if let Err(e) = f.node.events.publish(&load_subject, bytes).await {
                tracing::warn!(error = %e, "engine load not published");
            }
        }
    }
}
