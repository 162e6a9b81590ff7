//! The KV router service: the index of every worker's cached blocks, the live
//! model of in-flight requests, busy detection and selection, behind one
//! thread-safe handle.
//!
//! Selection ([`KvRouter::select`]) reads state and returns a [`Routing`]
//! decision without changing anything (that is `best_worker_id`); committing
//! it ([`KvRouter::begin`]) starts tracking the request and returns an
//! [`ActiveRequest`] guard that marks prefill done at the first token, counts
//! output blocks, and frees the request when dropped — at the end of the
//! stream, on an error, or when the client goes away, whichever comes first.
//! Index and sequence state sit behind separate short-held locks, so events
//! keep flowing while requests are scheduled.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use kvrouter_core::busy::{BusyMonitor, LoadThresholds, WorkerCapacity};
use kvrouter_core::hash::{LocalBlockHash, block_hashes, sequence_hashes};
use kvrouter_core::index::{ShardedIndex, ThreadedIndex, status_label};
use kvrouter_core::protocols::{ActiveLoad, KvCacheEventData, WorkerId};
use kvrouter_core::selection::{
    Candidate, RouteRequest, select_kv, select_random, select_round_robin, without_busy,
};
use kvrouter_core::sequences::{NewRequest, SequenceTracker, tracking_hashes};
use kvrouter_core::{
    ApproxIndex, KvCacheEventError, KvRouterConfig, OverlapScores, RadixIndex,
    RouterConfigOverride, RouterEvent, RouterMode, SelectionError, WorkerKey,
};
use kvrouter_runtime::endpoint::WorkerMetadata;
use parking_lot::Mutex;
use prometheus::IntGauge;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use crate::metrics::RouterMetrics;
use crate::sync::{ActiveSequenceEvent, AddRequest, SyncData};

/// Why a request could not be routed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    /// No worker is registered (or none is left after exclusions).
    #[error("no workers are available for this model")]
    NoWorkers,
    /// Every worker is over a busy threshold.
    #[error(
        "all workers are busy, please retry later (busy thresholds: {0}; change them with \
         --active-decode-blocks-threshold / --active-prefill-tokens-threshold / \
         --active-prefill-tokens-threshold-frac or POST /busy_threshold)"
    )]
    AllWorkersBusy(String),
    /// The request cannot be routed as given.
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// What a caller asks the router.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteQuery<'a> {
    /// The prompt's tokens.
    pub tokens: &'a [u32],
    /// Per-request configuration.
    pub config_override: Option<&'a RouterConfigOverride>,
    /// Only this data-parallel rank.
    pub dp_rank: Option<u32>,
    /// Only this worker (no selection).
    pub worker_id: Option<WorkerId>,
    /// Workers not to use (they failed this request already).
    pub exclude: &'a [WorkerId],
}

/// Where a request should go, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// The chosen rank.
    pub worker: WorkerKey,
    /// Prompt blocks cached there (0 outside kv mode).
    pub overlap_blocks: u32,
    /// Prompt length in tokens.
    pub isl: usize,
    /// Cost of the chosen rank (kv mode).
    pub cost: Option<f64>,
    local: Vec<LocalBlockHash>,
    seq_hashes: Option<Vec<u64>>,
}

impl Routing {
    /// The prompt's block hashes, as the router computed them.
    pub fn blocks(&self) -> &[LocalBlockHash] {
        &self.local
    }
}

/// Load the router sees on one worker rank.
#[derive(Debug, Clone, Serialize)]
pub struct RankState {
    /// Worker.
    pub worker_id: WorkerId,
    /// Rank.
    pub dp_rank: u32,
    /// Requests in flight.
    pub active_requests: usize,
    /// Predicted active decode blocks.
    pub active_decode_blocks: usize,
    /// Predicted queued prefill tokens.
    pub active_prefill_tokens: usize,
    /// Blocks the index holds for it.
    pub indexed_blocks: usize,
    /// Over a busy threshold.
    pub busy: bool,
}

enum Index {
    Exact(Mutex<RadixIndex>),
    Threaded {
        writer: Mutex<ThreadedIndex>,
        reader: Arc<ShardedIndex>,
    },
    Approx(Mutex<ApproxIndex>),
}

struct State {
    tracker: SequenceTracker,
    busy: BusyMonitor,
    workers: BTreeMap<WorkerId, WorkerMetadata>,
    /// A rank's gauges, resolved once (label lookups stay off the request path).
    gauges: HashMap<WorkerKey, [IntGauge; 3]>,
    rng: StdRng,
    rr: usize,
}

/// The KV router (see the module docs).
pub struct KvRouter {
    /// Workers that left: their late events must not resurrect them. Its own
    /// lock, so applying events never waits on the routing state.
    removed: parking_lot::RwLock<HashSet<WorkerId>>,
    /// Where this router's active-sequence changes go (replica sync), with its id.
    sync:
        parking_lot::RwLock<Option<(u64, tokio::sync::mpsc::UnboundedSender<ActiveSequenceEvent>)>>,
    mode: RouterMode,
    config: KvRouterConfig,
    block_size: usize,
    index: Index,
    state: Mutex<State>,
    metrics: RouterMetrics,
    worker_type: &'static str,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl KvRouter {
    /// A router for workers with KV blocks of `block_size` tokens.
    pub fn new(
        mode: RouterMode,
        config: KvRouterConfig,
        block_size: u32,
        thresholds: LoadThresholds,
        metrics: RouterMetrics,
    ) -> Arc<Self> {
        let index = if !config.use_kv_events {
            Index::Approx(Mutex::new(ApproxIndex::new(config.prune_config())))
        } else if config.router_event_threads > 1 {
            let writer = ThreadedIndex::new(config.router_event_threads as usize);
            let reader = writer.index().clone();
            Index::Threaded {
                writer: Mutex::new(writer),
                reader,
            }
        } else {
            Index::Exact(Mutex::new(RadixIndex::new()))
        };
        Arc::new(Self {
            removed: parking_lot::RwLock::new(HashSet::new()),
            sync: parking_lot::RwLock::new(None),
            mode,
            config,
            block_size: block_size.max(2) as usize,
            index,
            state: Mutex::new(State {
                tracker: SequenceTracker::new(block_size.max(2) as usize),
                busy: BusyMonitor::new(thresholds),
                workers: BTreeMap::new(),
                gauges: HashMap::new(),
                rng: StdRng::seed_from_u64(0x6b76_726f_7574_6572),
                rr: 0,
            }),
            metrics,
            worker_type: "decode",
        })
    }

    /// The routing mode.
    pub fn mode(&self) -> RouterMode {
        self.mode
    }

    /// The configuration.
    pub fn config(&self) -> &KvRouterConfig {
        &self.config
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The metrics it records.
    pub fn metrics(&self) -> &RouterMetrics {
        &self.metrics
    }

    /// Starts routing to a worker (or updates what it declared).
    pub fn add_worker(&self, id: WorkerId, meta: &WorkerMetadata) {
        let mut st = self.state.lock();
        self.removed.write().remove(&id);
        for r in 0..meta.data_parallel_size.max(1) {
            st.tracker.add_worker(WorkerKey::new(id, r));
        }
        st.busy.add_worker(
            id,
            WorkerCapacity {
                total_kv_blocks: meta.total_kv_blocks,
                max_num_batched_tokens: Some(meta.max_num_batched_tokens),
                data_parallel_size: meta.data_parallel_size.max(1),
            },
        );
        st.workers.insert(id, meta.clone());
        drop(st);
        self.refresh_gauges(id);
    }

    /// Stops routing to a worker and forgets its cache and requests.
    pub fn remove_worker(&self, id: WorkerId) {
        let ranks = {
            let mut st = self.state.lock();
            let ranks = st
                .workers
                .remove(&id)
                .map_or(1, |m| m.data_parallel_size.max(1));
            self.removed.write().insert(id);
            st.gauges.retain(|k, _| k.worker_id != id);
            st.tracker.remove_worker(id);
            st.busy.remove_worker(id);
            ranks
        };
        match &self.index {
            Index::Exact(i) => i.lock().remove_worker(id),
            Index::Threaded { writer, reader } => {
                writer.lock().flush();
                reader.remove_worker(id);
            }
            Index::Approx(i) => i.lock().remove_worker(id),
        }
        let label = id.to_string();
        for r in 0..ranks {
            let rank = r.to_string();
            let labels = [label.as_str(), rank.as_str(), self.worker_type];
            let _ = self
                .metrics
                .worker_decode_blocks
                .remove_label_values(&labels);
            let _ = self
                .metrics
                .worker_prefill_tokens
                .remove_label_values(&labels);
            let _ = self.metrics.worker_requests.remove_label_values(&labels);
        }
    }

    /// Registered workers.
    pub fn workers(&self) -> Vec<WorkerId> {
        self.state.lock().workers.keys().copied().collect()
    }

    /// Applies one KV event from a worker (counted by type and outcome).
    pub fn apply_event(&self, ev: &RouterEvent) {
        if self.removed.read().contains(&ev.worker_id) {
            return;
        }
        let kind = match &ev.event.data {
            KvCacheEventData::Stored(_) => "stored",
            KvCacheEventData::Removed(_) => "removed",
            KvCacheEventData::Cleared => "cleared",
        };
        let result: Result<(), KvCacheEventError> = match &self.index {
            Index::Exact(i) => i.lock().apply_event(ev),
            Index::Threaded { writer, .. } => {
                // Outcomes are counted by the shard threads; count submission here.
                writer.lock().submit(ev.clone());
                Ok(())
            }
            Index::Approx(i) => i.lock().apply_event(ev, Instant::now()),
        };
        if let Err(e) = result {
            tracing::debug!(worker = ev.worker_id, event_id = ev.event.event_id, error = %e, "KV event not fully applied");
        }
        self.metrics
            .events_applied
            .with_label_values(&[kind, status_label(result)])
            .inc();
    }

    /// Forgets every cached block of one rank (its engine restarted or its
    /// event history was lost); the rank stays routable.
    pub fn reset_rank(&self, key: WorkerKey) {
        match &self.index {
            Index::Exact(i) => i.lock().remove_worker_rank(key),
            Index::Threaded { writer, reader } => {
                writer.lock().flush();
                reader.remove_worker_rank(key);
            }
            Index::Approx(i) => i.lock().remove_worker(key.worker_id),
        }
    }

    /// A load report from a worker (`kv_metrics`).
    pub fn observe_load(&self, load: &ActiveLoad) {
        self.state.lock().busy.observe(load);
    }

    /// The busy thresholds in force.
    pub fn thresholds(&self) -> LoadThresholds {
        self.state.lock().busy.thresholds()
    }

    /// Replaces the busy thresholds (validated by the caller).
    pub fn set_thresholds(&self, t: LoadThresholds) {
        self.state.lock().busy.set_thresholds(t);
    }

    /// Which workers cache how much of `tokens` (no state change).
    pub fn find_matches(&self, tokens: &[u32]) -> OverlapScores {
        self.lookup(&block_hashes(tokens, self.block_size))
    }

    fn lookup(&self, local: &[LocalBlockHash]) -> OverlapScores {
        match &self.index {
            Index::Exact(i) => i.lock().find_matches(local),
            Index::Threaded { reader, .. } => reader.find_matches(local),
            Index::Approx(i) => {
                let mut i = i.lock();
                i.expire(Instant::now());
                i.find_matches(local)
            }
        }
    }

    /// Every cached block as events (snapshots, tests).
    pub fn dump_events(&self) -> Vec<RouterEvent> {
        match &self.index {
            Index::Exact(i) => i.lock().dump_events(),
            Index::Threaded { writer, reader } => {
                writer.lock().flush();
                reader.dump_events()
            }
            Index::Approx(i) => i.lock().tree().dump_events(),
        }
    }

    /// Blocks in the index.
    pub fn index_size(&self) -> usize {
        match &self.index {
            Index::Exact(i) => i.lock().current_size(),
            Index::Threaded { writer, reader } => {
                writer.lock().flush();
                reader.current_size()
            }
            Index::Approx(i) => i.lock().current_size(),
        }
    }

    /// Decides where a request goes, without changing any state.
    pub fn select(&self, q: &RouteQuery<'_>) -> Result<Routing, RouteError> {
        let started = Instant::now();
        let result = self.select_inner(q, started);
        let status = match &result {
            Ok(_) => "ok",
            Err(RouteError::NoWorkers) => "no_workers",
            Err(RouteError::AllWorkersBusy(_)) => "busy",
            Err(RouteError::Invalid(_)) => "invalid",
        };
        self.metrics
            .requests
            .with_label_values(&[self.mode.as_str(), status])
            .inc();
        if let Ok(r) = &result {
            self.metrics.total_ms.observe(ms(started));
            self.metrics.isl.observe(r.isl as f64);
            let blocks = r.isl / self.block_size;
            if blocks > 0 && self.mode == RouterMode::Kv {
                self.metrics
                    .kv_hit_rate
                    .observe(f64::from(r.overlap_blocks) / blocks as f64);
            }
        }
        result
    }

    fn select_inner(&self, q: &RouteQuery<'_>, started: Instant) -> Result<Routing, RouteError> {
        if q.tokens.is_empty() {
            return Err(RouteError::Invalid("the prompt has no tokens".into()));
        }
        if let Some(o) = q.config_override
            && let Some(e) = o.validate().into_iter().next()
        {
            return Err(RouteError::Invalid(format!(
                "router_config_override.{}: {}",
                e.fields.join(","),
                e.message
            )));
        }
        let isl = q.tokens.len();
        if self.mode != RouterMode::Kv {
            let mut st = self.state.lock();
            let ranks = self.eligible_ranks(&st, q);
            let ranks = self.drop_busy(&st, ranks)?;
            let i = match self.mode {
                RouterMode::Random => select_random(ranks.len(), &mut st.rng),
                _ => select_round_robin(&mut st.rr, ranks.len()),
            }
            .map_err(|_| RouteError::NoWorkers)?;
            self.metrics.scheduling_ms.observe(ms(started));
            return Ok(Routing {
                worker: ranks[i].worker,
                overlap_blocks: 0,
                isl,
                cost: None,
                local: Vec::new(),
                seq_hashes: None,
            });
        }
        let t = Instant::now();
        let local = block_hashes(q.tokens, self.block_size);
        self.metrics.block_hashing_ms.observe(ms(t));
        let t = Instant::now();
        let overlaps = self.lookup(&local);
        self.metrics.find_matches_ms.observe(ms(t));
        let t = Instant::now();
        let assume_reuse = q
            .config_override
            .map_or(self.config.router_assume_kv_reuse, |o| {
                o.assume_kv_reuse(&self.config)
            });
        let mut st = self.state.lock();
        let seq_hashes = tracking_hashes(
            &local,
            self.config.router_track_active_blocks,
            assume_reuse,
            &mut st.rng,
        );
        self.metrics.seq_hashing_ms.observe(ms(t));
        let t = Instant::now();
        let overlap_of = |w: WorkerKey| overlaps.score(w);
        let loads = st
            .tracker
            .potential_load(isl, seq_hashes.as_deref(), overlap_of);
        let allowed = self.eligible_ranks(&st, q);
        let candidates: Vec<Candidate> = loads
            .iter()
            .filter(|l| allowed.iter().any(|c| c.worker == l.worker))
            .map(|l| Candidate {
                worker: l.worker,
                overlap_blocks: overlap_of(l.worker),
                tree_size: overlaps.tree_size(l.worker).unwrap_or(0),
                prefill_tokens: l.prefill_tokens,
                decode_blocks: l.decode_blocks,
            })
            .collect();
        let candidates = self.drop_busy(&st, candidates)?;
        let default = RouterConfigOverride::default();
        let o = q.config_override.unwrap_or(&default);
        let req = RouteRequest {
            isl_tokens: isl,
            block_size: self.block_size,
            overlap_score_weight: o.weight(&self.config),
            temperature: o.temperature(&self.config),
        };
        let d = select_kv(&req, &candidates, &mut st.rng).map_err(|e| match e {
            SelectionError::EmptyPrompt => RouteError::Invalid(e.to_string()),
            _ => RouteError::NoWorkers,
        })?;
        drop(st);
        self.metrics.scheduling_ms.observe(ms(t));
        tracing::debug!(
            worker_id = d.worker.worker_id,
            dp_rank = d.worker.dp_rank,
            overlap = d.overlap_blocks,
            cost = d.cost,
            "{} = W * prefill_blocks + decode_blocks = {} * {:.3} + {:.3} (elapsed {:?})",
            d.cost,
            req.overlap_score_weight,
            d.prefill_blocks,
            d.decode_blocks,
            started.elapsed()
        );
        Ok(Routing {
            worker: d.worker,
            overlap_blocks: d.overlap_blocks,
            isl,
            cost: Some(d.cost),
            local,
            seq_hashes,
        })
    }

    /// Ranks allowed by the query (all registered ranks when unconstrained).
    fn eligible_ranks(&self, st: &State, q: &RouteQuery<'_>) -> Vec<Candidate> {
        let mut out = Vec::new();
        for (&id, meta) in &st.workers {
            if q.exclude.contains(&id) || q.worker_id.is_some_and(|w| w != id) {
                continue;
            }
            for r in 0..meta.data_parallel_size.max(1) {
                if q.dp_rank.is_some_and(|d| d != r) {
                    continue;
                }
                out.push(Candidate {
                    worker: WorkerKey::new(id, r),
                    overlap_blocks: 0,
                    tree_size: 0,
                    prefill_tokens: 0,
                    decode_blocks: 0,
                });
            }
        }
        out
    }

    fn drop_busy(&self, st: &State, c: Vec<Candidate>) -> Result<Vec<Candidate>, RouteError> {
        without_busy(c, &st.busy.busy_workers()).map_err(|e| match e {
            SelectionError::AllWorkersBusy => {
                RouteError::AllWorkersBusy(describe(&st.busy.thresholds()))
            }
            _ => RouteError::NoWorkers,
        })
    }

    /// Commits a decision: tracks the request until the returned guard drops.
    pub fn begin(
        self: &Arc<Self>,
        id: impl Into<String>,
        routing: &Routing,
        expected_output_tokens: Option<u32>,
    ) -> ActiveRequest {
        let id = id.into();
        self.metrics
            .selected
            .with_label_values(&[&routing.worker.worker_id.to_string()])
            .inc();
        let tracked = self.mode == RouterMode::Kv;
        if tracked {
            if let Index::Approx(i) = &self.index {
                let seq = sequence_hashes(&routing.local);
                i.lock().process_routing_decision(
                    routing.worker,
                    &routing.local,
                    &seq,
                    Instant::now(),
                );
            }
            let mut st = self.state.lock();
            let added = st.tracker.add_request(
                routing.worker,
                NewRequest {
                    id: &id,
                    seq_hashes: routing.seq_hashes.as_deref(),
                    isl: routing.isl,
                    overlap: routing.overlap_blocks,
                    expected_output_tokens,
                },
                Instant::now(),
            );
            if let Err(e) = added {
                tracing::warn!(request_id = %id, error = %e, "request not tracked");
            }
            self.observe_rank(&mut st, routing.worker);
            drop(st);
            self.publish(
                &id,
                routing.worker,
                SyncData::AddRequest(AddRequest {
                    token_sequence: routing.seq_hashes.clone(),
                    isl: routing.isl,
                    overlap: routing.overlap_blocks,
                    expected_output_tokens,
                }),
            );
        }
        ActiveRequest {
            router: self.clone(),
            id,
            worker: routing.worker,
            isl: routing.isl,
            prefill_done: false,
            generated: 0,
            tracked,
        }
    }

    /// Publishes a rank's predicted load to busy detection and the gauges.
    fn observe_rank(&self, st: &mut State, w: WorkerKey) {
        let (tokens, blocks, requests) = st.tracker.get(w).map_or((0, 0, 0), |s| {
            (s.active_tokens(), s.active_blocks(), s.num_requests())
        });
        st.busy.observe_router(w, tokens as u64, blocks as u64);
        let [decode, prefill, reqs] = st.gauges.entry(w).or_insert_with(|| {
            let id = w.worker_id.to_string();
            let rank = w.dp_rank.to_string();
            let labels = [id.as_str(), rank.as_str(), self.worker_type];
            [
                self.metrics.worker_decode_blocks.with_label_values(&labels),
                self.metrics
                    .worker_prefill_tokens
                    .with_label_values(&labels),
                self.metrics.worker_requests.with_label_values(&labels),
            ]
        });
        decode.set(blocks as i64);
        prefill.set(tokens as i64);
        reqs.set(requests as i64);
    }

    fn refresh_gauges(&self, id: WorkerId) {
        let mut st = self.state.lock();
        let ranks: Vec<WorkerKey> = st.tracker.workers().filter(|w| w.worker_id == id).collect();
        for w in ranks {
            self.observe_rank(&mut st, w);
        }
    }

    fn mark_prefill(&self, id: &str, w: WorkerKey) {
        let mut st = self.state.lock();
        if st.tracker.mark_prefill_completed(id).is_ok() {
            self.observe_rank(&mut st, w);
        }
        drop(st);
        self.publish(id, w, SyncData::MarkPrefillCompleted);
    }

    fn output_block(&self, id: &str, w: WorkerKey, decay: Option<f64>) {
        let mut st = self.state.lock();
        let h: u64 = st.rng.random();
        if st.tracker.add_output_block(id, h, decay).is_ok() {
            self.observe_rank(&mut st, w);
        }
    }

    fn free(&self, id: &str, w: WorkerKey) {
        let mut st = self.state.lock();
        if st.tracker.free(id).is_ok() {
            self.observe_rank(&mut st, w);
        }
        drop(st);
        self.publish(id, w, SyncData::Free);
    }

    /// Sends this router's active-sequence changes to `tx`, as router `router_id`.
    pub fn enable_replica_sync(
        &self,
        router_id: u64,
        tx: tokio::sync::mpsc::UnboundedSender<ActiveSequenceEvent>,
    ) {
        *self.sync.write() = Some((router_id, tx));
    }

    fn publish(&self, id: &str, w: WorkerKey, data: SyncData) {
        if let Some((router_id, tx)) = self.sync.read().as_ref() {
            let _ = tx.send(ActiveSequenceEvent {
                request_id: id.to_string(),
                worker: w.into(),
                router_id: *router_id,
                lora_name: None,
                data,
            });
        }
    }

    /// Applies another replica's change (own events are ignored).
    pub fn apply_replica_event(&self, ev: &ActiveSequenceEvent) {
        if self
            .sync
            .read()
            .as_ref()
            .is_some_and(|(me, _)| *me == ev.router_id)
        {
            return;
        }
        let w = WorkerKey::new(ev.worker.worker_id, ev.worker.dp_rank);
        let mut st = self.state.lock();
        if !st.workers.contains_key(&w.worker_id) {
            return; // not a worker this replica routes to (yet)
        }
        let result = match &ev.data {
            SyncData::AddRequest(a) => st.tracker.add_request(
                w,
                NewRequest {
                    id: &ev.request_id,
                    seq_hashes: a.token_sequence.as_deref(),
                    isl: a.isl,
                    overlap: a.overlap,
                    expected_output_tokens: a.expected_output_tokens,
                },
                Instant::now(),
            ),
            SyncData::MarkPrefillCompleted => st.tracker.mark_prefill_completed(&ev.request_id),
            SyncData::Free => st.tracker.free(&ev.request_id),
        };
        if let Err(e) = result {
            tracing::debug!(request_id = %ev.request_id, error = %e, "replica event not applied");
        }
        self.observe_rank(&mut st, w);
    }

    /// The load the router sees on every rank.
    pub fn state(&self) -> Vec<RankState> {
        let st = self.state.lock();
        let mut out: Vec<RankState> = st
            .tracker
            .workers()
            .map(|w| {
                let s = st.tracker.get(w);
                RankState {
                    worker_id: w.worker_id,
                    dp_rank: w.dp_rank,
                    active_requests: s.map_or(0, |s| s.num_requests()),
                    active_decode_blocks: s.map_or(0, |s| s.active_blocks()),
                    active_prefill_tokens: s.map_or(0, |s| s.active_tokens()),
                    indexed_blocks: 0,
                    busy: st.busy.rank_overloaded(w),
                }
            })
            .collect();
        drop(st);
        if let Index::Exact(i) = &self.index {
            let i = i.lock();
            for r in &mut out {
                r.indexed_blocks = i.worker_size(WorkerKey::new(r.worker_id, r.dp_rank));
            }
        }
        out.sort_by_key(|r| (r.worker_id, r.dp_rank));
        out
    }
}

/// Human-readable thresholds for the busy error.
fn describe(t: &LoadThresholds) -> String {
    let mut parts = Vec::new();
    if let Some(v) = t.active_decode_blocks_threshold {
        parts.push(format!("active_decode_blocks_threshold={v}"));
    }
    if let Some(v) = t.active_prefill_tokens_threshold {
        parts.push(format!("active_prefill_tokens_threshold={v}"));
    }
    if let Some(v) = t.active_prefill_tokens_threshold_frac {
        parts.push(format!("active_prefill_tokens_threshold_frac={v}"));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

impl kvrouter_engines::KvEventSink for KvRouter {
    fn apply_event(&self, ev: RouterEvent) {
        KvRouter::apply_event(self, &ev);
    }

    fn reset_rank(&self, key: WorkerKey) {
        KvRouter::reset_rank(self, key);
    }
}

/// A routed request being tracked; dropping it frees the request.
pub struct ActiveRequest {
    router: Arc<KvRouter>,
    id: String,
    worker: WorkerKey,
    isl: usize,
    prefill_done: bool,
    generated: u32,
    tracked: bool,
}

impl ActiveRequest {
    /// Where the request went.
    pub fn worker(&self) -> WorkerKey {
        self.worker
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Records `n` newly generated tokens (the first marks prefill done).
    pub fn on_tokens(&mut self, n: usize) {
        if !self.tracked {
            return;
        }
        if !self.prefill_done {
            self.prefill_done = true;
            self.router.mark_prefill(&self.id, self.worker);
        }
        if n == 0 || !self.router.config.router_track_output_blocks {
            self.generated = self.generated.saturating_add(n as u32);
            return;
        }
        let bs = self.router.block_size;
        let before = (self.isl + self.generated as usize).div_ceil(bs);
        self.generated = self.generated.saturating_add(n as u32);
        let after = (self.isl + self.generated as usize).div_ceil(bs);
        for _ in before..after {
            let expected = self
                .router
                .state
                .lock()
                .tracker
                .get(self.worker)
                .and_then(|s| s.expected_output_tokens(&self.id));
            let decay =
                kvrouter_core::sequences::ActiveSequences::output_decay(self.generated, expected);
            self.router.output_block(&self.id, self.worker, decay);
        }
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        if self.tracked {
            self.router.free(&self.id, self.worker);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> WorkerMetadata {
        WorkerMetadata {
            model_name: "m".into(),
            block_size: 4,
            total_kv_blocks: 1000,
            max_num_seqs: 16,
            max_num_batched_tokens: 1000,
            data_parallel_size: 1,
        }
    }

    fn router(mode: RouterMode, cfg: KvRouterConfig) -> Arc<KvRouter> {
        let r = KvRouter::new(
            mode,
            cfg,
            4,
            LoadThresholds::default(),
            RouterMetrics::unregistered(),
        );
        for id in 1..=4 {
            r.add_worker(id, &meta());
        }
        r
    }

    #[test]
    fn weight_zero_balances_distinct_load() {
        let r = router(RouterMode::Kv, KvRouterConfig::default());
        let tokens: Vec<u32> = (0..64).collect();
        let o = RouterConfigOverride {
            overlap_score_weight: Some(0.0),
            assume_kv_reuse: Some(false),
            ..Default::default()
        };
        let mut held = Vec::new();
        let mut seen = HashSet::new();
        for i in 0..4 {
            let q = RouteQuery {
                tokens: &tokens,
                config_override: Some(&o),
                ..Default::default()
            };
            let routing = r.select(&q).unwrap();
            seen.insert(routing.worker.worker_id);
            held.push(r.begin(format!("r{i}"), &routing, None));
        }
        assert_eq!(seen.len(), 4, "{:?}", r.state());
        drop(held);
        assert!(r.state().iter().all(|s| s.active_requests == 0));
    }

    #[test]
    fn guard_tracks_prefill_output_and_free() {
        let cfg = KvRouterConfig {
            router_track_output_blocks: true,
            ..KvRouterConfig::default()
        };
        let r = router(RouterMode::Kv, cfg);
        let tokens: Vec<u32> = (0..10).collect();
        let routing = r
            .select(&RouteQuery {
                tokens: &tokens,
                ..Default::default()
            })
            .unwrap();
        let mut g = r.begin("a", &routing, None);
        let rank = |r: &KvRouter| {
            r.state()
                .into_iter()
                .find(|s| s.worker_id == routing.worker.worker_id)
                .unwrap()
        };
        assert_eq!(rank(&r).active_prefill_tokens, 10);
        assert_eq!(rank(&r).active_decode_blocks, 2);
        g.on_tokens(1);
        assert_eq!(rank(&r).active_prefill_tokens, 0);
        // 10 prompt + 3 output tokens cross into a 4th block.
        g.on_tokens(2);
        assert_eq!(rank(&r).active_decode_blocks, 3);
        drop(g);
        assert_eq!(rank(&r).active_requests, 0);
        assert_eq!(rank(&r).active_decode_blocks, 0);
    }

    #[test]
    fn pinned_worker_exclusions_and_empty_prompt() {
        let r = router(RouterMode::RoundRobin, KvRouterConfig::default());
        let tokens = [1u32, 2, 3];
        let pinned = r
            .select(&RouteQuery {
                tokens: &tokens,
                worker_id: Some(3),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(pinned.worker.worker_id, 3);
        let all = [1, 2, 3, 4];
        assert_eq!(
            r.select(&RouteQuery {
                tokens: &tokens,
                exclude: &all,
                ..Default::default()
            }),
            Err(RouteError::NoWorkers)
        );
        assert!(matches!(
            r.select(&RouteQuery::default()),
            Err(RouteError::Invalid(_))
        ));
        r.remove_worker(2);
        let picks: HashSet<u64> = (0..6)
            .map(|_| {
                r.select(&RouteQuery {
                    tokens: &tokens,
                    ..Default::default()
                })
                .unwrap()
                .worker
                .worker_id
            })
            .collect();
        assert_eq!(picks, HashSet::from([1, 3, 4]));
    }
}
