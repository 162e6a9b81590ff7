//! The mocker as a live worker: engine ranks driven in real time (scaled by
//! `--speedup-ratio`), serving tokenized requests over the request plane and
//! publishing real KV events and load on the event plane.
//!
//! Each data-parallel rank is one task that owns an [`Engine`]: it takes new
//! requests and aborts between passes, plans a pass, sleeps for the pass's
//! simulated duration (on a running clock, so sub-millisecond passes at high
//! speed-ups keep their average rate), applies it, streams one token to each
//! request that sampled one, then publishes the pass's KV events as
//! `RouterEvent` JSON and the rank's `ActiveLoad`.
//!
//! Generated tokens are pseudo-random ids in the tokenizer's ordinary range,
//! seeded by the request's `seed` (or its id), so a seeded request always gets
//! the same text. The output-length model: unless `ignore_eos` is set, each
//! token after `min_tokens` — never the first, so no answer is empty — ends
//! the request with probability `eos_probability` (finish reason `eos`; the
//! binary uses 1/200, a mean of about 200 tokens); otherwise `max_tokens`
//! (default [`DEFAULT_MAX_TOKENS`]) ends it (`length`).
//! The request handler is in [`generate`]; recovery queries in [`crate::query`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kvrouter_core::protocols::RouterEvent;
use kvrouter_runtime::endpoint::{EndpointId, InstanceId, WorkerMetadata};
use kvrouter_runtime::events::{DurableEvents, EventPlane};
use kvrouter_runtime::node::{Node, ServeError, Served};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod generate;

use crate::blocks::FullBlock;
use crate::engine::{Engine, EngineConfig, EngineRequest, TokenOutput};
use crate::query::{QueryHandler, RankLog};
use crate::vllm::{RankStats, TokenBook, ZmqEventsConfig};
use kvrouter_core::recovery::LocalLog;
use kvrouter_engines::publisher::ZmqKvPublisher;

/// Tokens generated when a request sets no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 256;

/// What a worker does in a disaggregated deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Prefill and decode (the default).
    #[default]
    Aggregated,
    /// Prefill only: computes the prompt's KV, answers one token and the
    /// parameters a decode worker needs (`disaggregated_params`).
    Prefill,
    /// Decode: a request carrying `prefill_result` receives the prompt's KV
    /// (its blocks enter the cache) instead of computing it.
    Decode,
}

/// A live mock worker's settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The engine of each rank.
    pub engine: EngineConfig,
    /// Data-parallel ranks.
    pub data_parallel_size: u32,
    /// Model name registered.
    pub model_name: String,
    /// Token ids generated are drawn from this range.
    pub vocab: std::ops::Range<u32>,
    /// Chance that a token ends the request (after `min_tokens`).
    pub eos_probability: f64,
    /// Context window in tokens: prompt plus output never exceed it.
    pub context_length: u32,
    /// Publish KV events to the JetStream stream, waiting for each
    /// acknowledgement (`--durable-kv-events`; needs NATS).
    pub durable_kv_events: bool,
    /// Aggregated, prefill-only or decode.
    pub role: Role,
    /// Also publish KV events as vLLM does, on ZeroMQ (a stand-in engine).
    pub zmq_events: Option<ZmqEventsConfig>,
    /// A testing aid: every answer is these tokens (then a stop), instead of
    /// sampled ones (`--mock-response-text`).
    pub script: Option<Arc<Vec<u32>>>,
}

impl Default for WorkerConfig {
    /// The mocker's defaults: one rank, the built-in tokenizer's ordinary
    /// tokens (ids 3..4096), EOS never sampled, a 32k context.
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            data_parallel_size: 1,
            model_name: "mock-model".into(),
            vocab: 3..4096,
            eos_probability: 0.0,
            context_length: 32_768,
            durable_kv_events: false,
            role: Role::Aggregated,
            zmq_events: None,
            script: None,
        }
    }
}

/// A running mock worker; dropping it deregisters and stops its engines.
pub struct MockWorker {
    served: Option<Served>,
    /// The recovery-query endpoint, registered before `served`.
    query: Option<Served>,
    /// Generations in flight.
    active: Arc<AtomicUsize>,
    logs: Vec<RankLog>,
    cancel: CancellationToken,
    stats: Vec<Arc<RankStats>>,
    zmq: Vec<(String, Option<String>)>,
}

impl MockWorker {
    /// Each rank's load, kept current by its engine loop.
    pub fn stats(&self) -> &[Arc<RankStats>] {
        &self.stats
    }

    /// Each rank's bound ZeroMQ PUB and replay addresses (vLLM-format events).
    pub fn zmq_addresses(&self) -> &[(String, Option<String>)] {
        &self.zmq
    }

    /// Each rank's log of its own KV events (what recovery queries answer from).
    pub fn logs(&self) -> &[RankLog] {
        &self.logs
    }

    /// Generations in flight.
    pub fn in_flight(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Leaves discovery (the worker first, then its query endpoint) and waits
    /// until the store has it; requests in flight go on being served.
    pub async fn deregister(&mut self) {
        if let Some(s) = self.served.as_mut() {
            s.deregister().await;
        }
        if let Some(s) = self.query.as_mut() {
            s.deregister().await;
        }
    }

    /// The instance id.
    pub fn id(&self) -> InstanceId {
        self.served.as_ref().map_or(0, |s| s.instance.id)
    }

    /// Stops like a crashed process: serving ends, the lease is left to expire.
    pub fn crash(mut self) {
        self.cancel.cancel();
        if let Some(s) = self.served.take() {
            s.abandon();
        }
        if let Some(s) = self.query.take() {
            s.abandon();
        }
    }
}

impl Drop for MockWorker {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

enum Command {
    Add(EngineRequest, mpsc::UnboundedSender<TokenOutput>),
    Abort(u64),
    /// KV received from a prefill worker.
    Import(Vec<FullBlock>),
}

struct Ranks {
    worker_id: InstanceId,
    tx: Vec<mpsc::UnboundedSender<Command>>,
    cfg: WorkerConfig,
    next_id: AtomicU64,
    /// Per rank, when publishing vLLM events: prompt tokens of in-flight blocks.
    books: Vec<Arc<TokenBook>>,
    /// Generations in flight (for a graceful stop).
    active: Arc<AtomicUsize>,
}

/// Starts a worker serving `endpoint` as instance `id`.
pub async fn start(
    node: &Node,
    endpoint: &EndpointId,
    id: InstanceId,
    cfg: WorkerConfig,
) -> Result<MockWorker, ServeError> {
    let cancel = CancellationToken::new();
    let ranks = cfg.data_parallel_size.max(1);
    let events_subject = kvrouter_runtime::subjects::kv_events(endpoint);
    let load_subject = kvrouter_runtime::subjects::kv_metrics(&endpoint.namespace);
    let durable = if cfg.durable_kv_events {
        let client = node
            .nats
            .clone()
            .ok_or_else(|| ServeError::Nats("--durable-kv-events needs NATS (JetStream)".into()))?;
        Some(
            kvrouter_runtime::events::open_kv_stream(client, endpoint)
                .await
                .map_err(|e| ServeError::Nats(e.to_string()))?,
        )
    } else {
        None
    };
    let mut tx = Vec::new();
    let mut stats = Vec::new();
    let mut books = Vec::new();
    let mut zmq_addresses = Vec::new();
    let mut logs = Vec::new();
    let active = Arc::new(AtomicUsize::new(0));
    for r in 0..ranks {
        let log: RankLog = Arc::new(parking_lot::Mutex::new(LocalLog::new(id, r)));
        logs.push(log.clone());
        let (t, rx) = mpsc::unbounded_channel();
        tx.push(t);
        let engine = Engine::new(cfg.engine, id, r);
        let zmq = match &cfg.zmq_events {
            Some(z) => {
                let publisher = z.bind(r).await.map_err(|e| ServeError::Bind {
                    addr: format!("ZeroMQ KV events of rank {r} (port {} + {r})", z.port),
                    source: std::io::Error::other(e.to_string()),
                })?;
                let book = Arc::new(TokenBook::default());
                books.push(book.clone());
                zmq_addresses.push((
                    publisher.address().to_string(),
                    publisher.replay_address().map(str::to_string),
                ));
                Some((publisher, book))
            }
            None => None,
        };
        let rank_stats = Arc::new(RankStats::default());
        stats.push(rank_stats.clone());
        let publisher = Publisher {
            events: node.events.clone(),
            durable: durable.clone(),
            events_subject: events_subject.clone(),
            load_subject: load_subject.clone(),
            zmq,
            stats: rank_stats,
            log,
        };
        tokio::spawn(rank_loop(engine, id, rx, publisher, cancel.clone()));
    }
    let handler = Arc::new(Ranks {
        worker_id: id,
        tx,
        cfg: cfg.clone(),
        next_id: AtomicU64::new(1),
        books,
        active: active.clone(),
    });
    let meta = WorkerMetadata {
        model_name: cfg.model_name.clone(),
        block_size: cfg.engine.block_size as u32,
        total_kv_blocks: cfg.engine.num_gpu_blocks as u64,
        max_num_seqs: cfg.engine.max_num_seqs as u64,
        max_num_batched_tokens: cfg.engine.max_num_batched_tokens as u64,
        data_parallel_size: ranks,
        enable_local_indexer: true,
    };
    // The query endpoint first: a router that sees the worker can ask it at once.
    let query = node
        .serve(
            &kvrouter_runtime::subjects::kv_query_endpoint(endpoint),
            id,
            Arc::new(QueryHandler { logs: logs.clone() }),
            serde_json::json!({}),
        )
        .await?;
    let served = node
        .serve(
            endpoint,
            id,
            handler,
            serde_json::to_value(meta).expect("metadata serializes"),
        )
        .await?;
    Ok(MockWorker {
        served: Some(served),
        query: Some(query),
        logs,
        active,
        cancel,
        stats,
        zmq: zmq_addresses,
    })
}

/// Where a rank's KV events and load go.
struct Publisher {
    events: Arc<dyn EventPlane>,
    /// The JetStream stream, in durable mode.
    durable: Option<DurableEvents>,
    events_subject: String,
    load_subject: String,
    /// vLLM-format publishing (a stand-in engine), with the rank's token book.
    zmq: Option<(ZmqKvPublisher, Arc<TokenBook>)>,
    /// The rank's load, for vLLM-named metrics.
    stats: Arc<RankStats>,
    /// The rank's own events, for recovery queries.
    log: RankLog,
}

async fn rank_loop(
    mut engine: Engine,
    worker_id: InstanceId,
    mut rx: mpsc::UnboundedReceiver<Command>,
    publisher: Publisher,
    cancel: CancellationToken,
) {
    let Publisher {
        events,
        durable,
        events_subject,
        load_subject,
        mut zmq,
        stats,
        log,
    } = publisher;
    let block_size = engine.config().block_size;
    stats
        .kv_total_blocks
        .store(engine.config().num_gpu_blocks as u64, Ordering::Relaxed);
    let mut outputs: HashMap<u64, mpsc::UnboundedSender<TokenOutput>> = HashMap::new();
    // Simulated time runs ahead of the wall clock by less than one pass.
    let mut clock = Instant::now();
    let mut last_load = None;
    loop {
        if !engine.has_work() {
            let cmd = tokio::select! {
                _ = cancel.cancelled() => return,
                c = rx.recv() => match c { Some(c) => c, None => return },
            };
            apply(&mut engine, &mut outputs, cmd);
            clock = Instant::now();
        }
        while let Ok(cmd) = rx.try_recv() {
            apply(&mut engine, &mut outputs, cmd);
        }
        let Some(step_ms) = engine.plan_step() else {
            // Work is queued but cannot be scheduled (blocks exhausted): wait for a change.
            let cmd = tokio::select! {
                _ = cancel.cancelled() => return,
                c = rx.recv() => match c { Some(c) => c, None => return },
            };
            apply(&mut engine, &mut outputs, cmd);
            continue;
        };
        clock = clock.max(Instant::now() - Duration::from_millis(5));
        clock += Duration::from_secs_f64(step_ms / 1e3);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(clock) => {}
        }
        let step = engine.finish_step();
        for t in step.tokens {
            // A send fails only when the caller is gone; its abort is on its way.
            if let Some(tx) = outputs.get(&t.request) {
                let _ = tx.send(t);
            }
            if t.finished {
                outputs.remove(&t.request);
            }
        }
        if let Some((publisher, book)) = &mut zmq {
            let batch = crate::vllm::engine_events(&step.events, book, block_size);
            if let Err(e) = publisher.publish(&batch).await {
                tracing::warn!(error = %e, "ZeroMQ KV events not published");
            }
        }
        let m = engine.metrics();
        let (queries, hits) = engine.prefix_cache_tokens();
        stats
            .running
            .store(m.worker_stats.request_active_slots, Ordering::Relaxed);
        stats
            .waiting
            .store(m.worker_stats.num_requests_waiting, Ordering::Relaxed);
        stats
            .kv_used_blocks
            .store(m.kv_stats.kv_active_blocks, Ordering::Relaxed);
        stats.prefix_queries.store(queries, Ordering::Relaxed);
        stats.prefix_hits.store(hits, Ordering::Relaxed);
        // Recorded before publishing, all of a pass at once: a query never
        // sees half a pass, and never misses an event a router received.
        {
            let mut log = log.lock();
            for ev in &step.events {
                log.record(ev);
            }
        }
        for ev in step.events {
            let msg = RouterEvent::new(worker_id, ev);
            let bytes = Bytes::from(serde_json::to_vec(&msg).expect("events serialize"));
            let published = match &durable {
                Some(stream) => stream.publish(bytes).await.map(|_| ()),
                None => events.publish(&events_subject, bytes).await,
            };
            if let Err(e) = published {
                stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "KV event not published");
            }
        }
        let load = engine.active_load();
        if last_load != Some(load) {
            last_load = Some(load);
            let bytes = serde_json::to_vec(&load).expect("load serializes");
            if let Err(e) = events.publish(&load_subject, Bytes::from(bytes)).await {
                stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "load report not published");
            }
        }
    }
}

fn apply(
    engine: &mut Engine,
    outputs: &mut HashMap<u64, mpsc::UnboundedSender<TokenOutput>>,
    cmd: Command,
) {
    match cmd {
        Command::Add(req, tx) => {
            outputs.insert(req.id, tx);
            engine.add_request(req);
        }
        Command::Abort(id) => {
            outputs.remove(&id);
            engine.abort(id);
        }
        Command::Import(blocks) => {
            let n = engine.import_blocks(&blocks);
            tracing::debug!(blocks = n, "prefill KV received");
        }
    }
}
