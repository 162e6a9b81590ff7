//! One simulated router per mode: what it keeps between requests and how it
//! picks a rank.
//!
//! kvrouter's own modes run the live router's [`Pipeline`] (lookup → select →
//! commit) over the index form the live router would build; the peers'
//! policies ([`kvrouter_core::peers`]) run over the state their routers keep:
//! sglang-router an approximate tree fed by its own decisions and in-flight
//! counts, SMG's `prefix_hash` a ring and in-flight counts, llm-d an index fed
//! by KV events plus each engine's waiting queue and KV usage, read from the
//! engine at the moment of the decision (llm-d scrapes them every few tens of
//! milliseconds; the simulator gives it fresh figures, its best case).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use kvrouter_core::index::{ApproxIndex, KvIndex, PruneConfig, RadixIndex};
use kvrouter_core::peers::{CacheAware, LlmdScorers, PeerRank, PrefixHash};
use kvrouter_core::protocols::{OverlapScores, WorkerKey};
use kvrouter_core::schedule::{KvPolicy, Params, Pipeline, RankFilter};
use kvrouter_core::sequences::{NewRequest, SequenceTracker};
use kvrouter_core::{KvRouterConfig, RouterMode};
use parking_lot::Mutex;
use rand::rngs::StdRng;

use super::{SimMode, SimRequest};
use crate::engine::Engine;

/// The per-mode policy and its state.
enum Policy {
    /// Round-robin or random.
    Plain(RouterMode),
    /// kvrouter's KV pipeline (`kv`, `kv-approx`, `kv-sticky`).
    Kv,
    /// sglang-router `cache_aware`.
    CacheAware(CacheAware),
    /// SMG `prefix_hash`.
    PrefixHash(PrefixHash),
    /// llm-d's scorers.
    Llmd(LlmdScorers),
}

/// A simulated router (see the module docs).
pub(super) struct SimRouter {
    mode: SimMode,
    policy: Policy,
    pipeline: Pipeline,
    params: Params,
    index: Option<Box<dyn KvIndex>>,
    ranks: Vec<WorkerKey>,
    rr: usize,
    no_busy: HashSet<u64>,
}

impl SimRouter {
    /// The router for `mode` over `ranks` (slot order).
    pub(super) fn new(
        mode: SimMode,
        block_size: usize,
        cfg: &KvRouterConfig,
        ranks: Vec<WorkerKey>,
    ) -> Self {
        let kv_policy = match mode {
            SimMode::KvSticky => KvPolicy::Sticky {
                spill: cfg.router_sticky_spill,
                stake: cfg.router_sticky_stake,
            },
            _ => KvPolicy::Cost,
        };
        let pipeline = Pipeline::new(block_size, cfg.clone()).with_policy(kv_policy);
        let exact =
            || -> Option<Box<dyn KvIndex>> { Some(Box::new(Mutex::new(RadixIndex::new()))) };
        let (policy, index) = match mode {
            SimMode::RoundRobin => (Policy::Plain(RouterMode::RoundRobin), None),
            SimMode::Random => (Policy::Plain(RouterMode::Random), None),
            SimMode::Kv | SimMode::KvSticky => (Policy::Kv, exact()),
            SimMode::KvApprox => (
                Policy::Kv,
                Some(Box::new(Mutex::new(ApproxIndex::new(cfg.prune_config()))) as Box<dyn KvIndex>),
            ),
            SimMode::SglangCacheAware => {
                // sglang's tree forgets by size only (LRU), never by age.
                let prune = PruneConfig {
                    ttl: Duration::from_secs(10_000_000),
                    ..cfg.prune_config()
                };
                (
                    Policy::CacheAware(CacheAware::default()),
                    Some(Box::new(Mutex::new(ApproxIndex::new(prune))) as Box<dyn KvIndex>),
                )
            }
            SimMode::PrefixHash => (
                Policy::PrefixHash(PrefixHash::new(ranks.len(), 1.25, 256)),
                None,
            ),
            SimMode::Llmd => (Policy::Llmd(LlmdScorers::default()), exact()),
            SimMode::Oracle => unreachable!("the oracle routes nothing"),
        };
        let params = pipeline.params(None);
        Self {
            mode,
            policy,
            pipeline,
            params,
            index,
            ranks,
            rr: 0,
            no_busy: HashSet::new(),
        }
    }

    /// The index that hears the engines' KV events, if this mode has one.
    pub(super) fn event_index(&self) -> Option<&dyn KvIndex> {
        match self.mode {
            SimMode::Kv | SimMode::KvSticky | SimMode::Llmd => self.index.as_deref(),
            _ => None,
        }
    }

    /// Whether the router queue applies (kvrouter's KV modes, as live).
    pub(super) fn queues(&self) -> bool {
        matches!(self.policy, Policy::Kv)
    }

    /// KV events the index rejected.
    pub(super) fn event_errors(&self) -> u64 {
        self.index.as_ref().map_or(0, |i| i.event_errors())
    }

    /// Routes request `id` and commits it to `tracker`; returns the slot.
    pub(super) fn route(
        &mut self,
        id: &str,
        r: &SimRequest,
        at: Instant,
        tracker: &mut SequenceTracker,
        engines: &[Engine],
        rng: &mut StdRng,
    ) -> usize {
        let worker = match &self.policy {
            Policy::Plain(plain) => {
                self.pipeline
                    .select_plain(
                        *plain,
                        r.prompt_tokens,
                        self.ranks.clone(),
                        &self.no_busy,
                        &mut self.rr,
                        rng,
                    )
                    .expect("every simulated rank is a candidate")
                    .worker
            }
            Policy::Kv => {
                let index = self.index.as_deref().expect("KV modes have an index");
                let p = &self.pipeline;
                let overlaps = p.lookup(index, &r.local, at);
                let hashes = p.tracking_hashes(&r.local, &self.params, rng);
                let filter = RankFilter {
                    allowed: None,
                    busy: &self.no_busy,
                };
                let plan = p
                    .select_kv(
                        r.prompt_tokens,
                        &r.local,
                        &self.params,
                        hashes,
                        &overlaps,
                        tracker,
                        filter,
                        rng,
                    )
                    .expect("every simulated rank is a candidate");
                let _ = p.commit(index, tracker, id, &r.local, &plan, None, at);
                plan.worker
            }
            peer => {
                let overlaps = self
                    .index
                    .as_deref()
                    .map(|index| index.find_matches(&r.local, at))
                    .unwrap_or_default();
                let views = self.views(&overlaps, tracker, engines);
                let slot = match peer {
                    Policy::CacheAware(p) => p.select(r.local.len(), &views),
                    Policy::Llmd(p) => p.select(r.local.len(), &views, rng),
                    Policy::PrefixHash(p) => {
                        let key = p
                            .key_block(self.pipeline.block_size(), r.seq.len())
                            .map_or(r.prompt_tokens as u64, |b| r.seq[b].0);
                        let loads: Vec<usize> = views.iter().map(|v| v.in_flight).collect();
                        p.select(key, &loads)
                    }
                    Policy::Plain(_) | Policy::Kv => unreachable!("handled above"),
                };
                let worker = self.ranks[slot];
                if let Some(index) = &self.index {
                    index.learn_routing(worker, &r.local, at);
                }
                let req = NewRequest {
                    id,
                    seq_hashes: None,
                    isl: r.prompt_tokens,
                    overlap: overlaps.score(worker),
                    expected_output_tokens: None,
                };
                let _ = tracker.add_request(worker, req, at);
                worker
            }
        };
        self.ranks
            .iter()
            .position(|&k| k == worker)
            .expect("a simulated rank")
    }

    /// What a peer policy sees of each rank, in slot order.
    fn views(
        &self,
        overlaps: &OverlapScores,
        tracker: &SequenceTracker,
        engines: &[Engine],
    ) -> Vec<PeerRank> {
        self.ranks
            .iter()
            .zip(engines)
            .map(|(&k, e)| {
                let blocks = e.blocks();
                PeerRank {
                    cached_blocks: overlaps.score(k),
                    tree_blocks: self
                        .index
                        .as_ref()
                        .and_then(|i| i.worker_size(k))
                        .unwrap_or(0),
                    in_flight: tracker.get(k).map_or(0, |a| a.num_requests()),
                    waiting: e.queue_depth().0,
                    kv_usage: blocks.active_slots() as f64 / blocks.capacity().max(1) as f64,
                }
            })
            .collect()
    }
}
