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
//!
//! The scheduling itself is the core's [`Pipeline`], shared with the offline
//! simulator; this handle adds what is the service's own: locks, metrics,
//! worker registration and replica sync. Rooms: selection and commit
//! (`select`), the request guard (`active`), replica sync (`replica`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use kvrouter_core::busy::{BusyMonitor, LoadThresholds, WorkerCapacity};
use kvrouter_core::hash::LocalBlockHash;
use kvrouter_core::index::{KvIndex, index_for, status_label};
use kvrouter_core::protocols::{ActiveLoad, KvCacheEventData, WorkerId};
use kvrouter_core::schedule::{KvPolicy, Pipeline, Plan};
use kvrouter_core::sequences::SequenceTracker;
use kvrouter_core::{
    KvRouterConfig, OverlapScores, RouterConfigOverride, RouterEvent, RouterMode, WorkerKey,
};
use kvrouter_runtime::endpoint::WorkerMetadata;
use parking_lot::Mutex;
use prometheus::IntGauge;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;

use crate::metrics::RouterMetrics;
use crate::sync::ActiveSequenceEvent;

mod active;
mod queue;
mod replica;
mod select;

pub use active::ActiveRequest;
pub use queue::Turn;

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
    plan: Plan,
    local: Vec<LocalBlockHash>,
}

impl Routing {
    fn new(plan: Plan, local: Vec<LocalBlockHash>) -> Self {
        Self {
            worker: plan.worker,
            overlap_blocks: plan.overlap_blocks,
            isl: plan.isl,
            cost: plan.decision.map(|d| d.cost),
            plan,
            local,
        }
    }

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

type Workers = BTreeMap<WorkerId, WorkerMetadata>;

struct State {
    tracker: SequenceTracker,
    busy: BusyMonitor,
    workers: Workers,
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
    pipeline: Pipeline,
    index: Box<dyn KvIndex>,
    state: Mutex<State>,
    /// Held requests; taken before `state` when both are needed, never after.
    queue: Mutex<queue::Queue>,
    metrics: RouterMetrics,
    worker_type: &'static str,
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
        let block_size = block_size.max(2) as usize;
        let policy = match mode {
            RouterMode::KvSticky => KvPolicy::Sticky {
                spill: config.router_sticky_spill,
                stake: config.router_sticky_stake,
            },
            _ => KvPolicy::Cost,
        };
        Arc::new(Self {
            removed: parking_lot::RwLock::new(HashSet::new()),
            sync: parking_lot::RwLock::new(None),
            mode,
            index: index_for(&config),
            queue: Mutex::new(queue::Queue::new(&config)),
            pipeline: Pipeline::new(block_size, config).with_policy(policy),
            state: Mutex::new(State {
                tracker: SequenceTracker::new(block_size),
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
        self.pipeline.config()
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> usize {
        self.pipeline.block_size()
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
        self.release_held();
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
        self.index.remove_worker(id);
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
        // The threaded index counts outcomes on its shard threads and answers
        // `Ok` here: this counts the submission.
        let result = self.index.apply_event(ev, Instant::now());
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
        self.index.reset_rank(key);
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
        let local = self.pipeline.block_hashes(tokens);
        self.pipeline
            .lookup(self.index.as_ref(), &local, Instant::now())
    }

    /// Every cached block as events (snapshots, tests).
    pub fn dump_events(&self) -> Vec<RouterEvent> {
        self.index.dump_events()
    }

    /// Blocks in the index.
    pub fn index_size(&self) -> usize {
        self.index.current_size()
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
        for r in &mut out {
            let key = WorkerKey::new(r.worker_id, r.dp_rank);
            r.indexed_blocks = self.index.worker_size(key).unwrap_or(0);
        }
        out.sort_by_key(|r| (r.worker_id, r.dp_rank));
        out
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

#[cfg(test)]
mod tests;
