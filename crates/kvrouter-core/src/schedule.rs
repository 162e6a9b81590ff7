//! The scheduling pipeline of one request, written once for the live router
//! and the offline simulator: block hashes → index lookup → tracking hashes →
//! eligible ranks → selection → commit.
//!
//! Each stage is its own method so the router can time stages and take its
//! locks around exactly the state a stage reads (the lookup runs outside the
//! sequence lock, selection under it), while the simulator calls the same
//! stages back to back in virtual time. Selection reads state and returns a
//! [`Plan`]; only [`Pipeline::commit`] changes anything, so a plan can also be
//! answered without being followed (`best_worker_id`).

use std::collections::HashSet;
use std::time::Instant;

use rand::Rng;

use crate::config::{KvRouterConfig, RouterConfigOverride};
use crate::hash::{LocalBlockHash, block_hashes};
use crate::index::KvIndex;
use crate::protocols::{OverlapScores, WorkerId, WorkerKey};
use crate::selection::{
    Candidate, Decision, RouteRequest, RouterMode, SelectionError, select_kv, select_random,
    select_round_robin, without_busy,
};
use crate::sequences::{NewRequest, SequenceError, SequenceTracker, tracking_hashes};

/// One request's selection knobs, after its overrides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Weight of prefill blocks in the cost.
    pub overlap_score_weight: f64,
    /// Softmax temperature.
    pub temperature: f64,
    /// Whether the prompt's blocks are assumed shared with other requests.
    pub assume_kv_reuse: bool,
}

/// Which ranks a request may use besides being registered: `allowed`
/// (pins and exclusions; `None` allows every rank) and the workers over a busy
/// threshold.
#[derive(Clone, Copy)]
pub struct RankFilter<'a> {
    /// A rank passes when this says so.
    pub allowed: Option<&'a dyn Fn(WorkerKey) -> bool>,
    /// Workers to skip unless every candidate is among them (then the
    /// request fails as busy).
    pub busy: &'a HashSet<WorkerId>,
}

/// Where a request should go, before it is committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The chosen rank.
    pub worker: WorkerKey,
    /// Prompt blocks cached there (0 outside the KV cost).
    pub overlap_blocks: u32,
    /// Prompt length in tokens.
    pub isl: usize,
    /// The cost's breakdown (KV cost only).
    pub decision: Option<Decision>,
    /// The hashes its blocks are tracked under on the chosen rank.
    pub seq_hashes: Option<Vec<u64>>,
}

/// How the KV-aware stage picks among the candidates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvPolicy {
    /// The reference cost, `W · prefill_blocks + decode_blocks` (`kv`).
    Cost,
    /// Prefix families kept on one rank within a load bound (`kv-sticky`,
    /// [`crate::sticky`]); `spill` is how far above the mean cost a rank may run.
    Sticky {
        /// Load bound above the mean cost, as a fraction.
        spill: f64,
        /// How much further a rank caching the whole prompt may run.
        stake: f64,
    },
}

/// The pipeline (see the module docs).
#[derive(Debug, Clone)]
pub struct Pipeline {
    block_size: usize,
    config: KvRouterConfig,
    policy: KvPolicy,
}

impl Pipeline {
    /// A pipeline for blocks of `block_size` tokens, with the reference cost.
    pub fn new(block_size: usize, config: KvRouterConfig) -> Self {
        Self {
            block_size,
            config,
            policy: KvPolicy::Cost,
        }
    }

    /// The same pipeline with another KV policy.
    pub fn with_policy(mut self, policy: KvPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The KV policy it applies.
    pub fn policy(&self) -> KvPolicy {
        self.policy
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The router configuration it applies.
    pub fn config(&self) -> &KvRouterConfig {
        &self.config
    }

    /// The knobs of one request: its overrides over the configuration.
    pub fn params(&self, o: Option<&RouterConfigOverride>) -> Params {
        let c = &self.config;
        match o {
            Some(o) => Params {
                overlap_score_weight: o.weight(c),
                temperature: o.temperature(c),
                assume_kv_reuse: o.assume_kv_reuse(c),
            },
            None => Params {
                overlap_score_weight: c.overlap_score_weight,
                temperature: c.router_temperature,
                assume_kv_reuse: c.router_assume_kv_reuse,
            },
        }
    }

    /// Stage 1: the prompt's full blocks.
    pub fn block_hashes(&self, tokens: &[u32]) -> Vec<LocalBlockHash> {
        block_hashes(tokens, self.block_size)
    }

    /// Stage 2: what every rank caches of them.
    pub fn lookup(
        &self,
        index: &dyn KvIndex,
        local: &[LocalBlockHash],
        now: Instant,
    ) -> OverlapScores {
        index.find_matches(local, now)
    }

    /// Stage 3: the hashes the request's blocks are tracked under (`None`
    /// when active blocks are not tracked).
    pub fn tracking_hashes<R: Rng + ?Sized>(
        &self,
        local: &[LocalBlockHash],
        p: &Params,
        rng: &mut R,
    ) -> Option<Vec<u64>> {
        tracking_hashes(
            local,
            self.config.router_track_active_blocks,
            p.assume_kv_reuse,
            rng,
        )
    }

    /// Stages 4–5 of the KV policies: every eligible rank's load with this
    /// request added, then the policy's pick (`local` is the prompt's blocks,
    /// the first naming its family for `kv-sticky`).
    #[allow(clippy::too_many_arguments)]
    pub fn select_kv<R: Rng + ?Sized>(
        &self,
        isl: usize,
        local: &[LocalBlockHash],
        p: &Params,
        seq_hashes: Option<Vec<u64>>,
        overlaps: &OverlapScores,
        tracker: &SequenceTracker,
        filter: RankFilter<'_>,
        rng: &mut R,
    ) -> Result<Plan, SelectionError> {
        let overlap_of = |w: WorkerKey| overlaps.score(w);
        let loads = tracker.potential_load(isl, seq_hashes.as_deref(), overlap_of);
        let candidates: Vec<Candidate> = loads
            .iter()
            .filter(|l| filter.allowed.is_none_or(|ok| ok(l.worker)))
            .map(|l| Candidate {
                worker: l.worker,
                overlap_blocks: overlap_of(l.worker),
                tree_size: overlaps.tree_size(l.worker).unwrap_or(0),
                prefill_tokens: l.prefill_tokens,
                decode_blocks: l.decode_blocks,
            })
            .collect();
        let candidates = without_busy(candidates, filter.busy)?;
        let req = RouteRequest {
            isl_tokens: isl,
            block_size: self.block_size,
            overlap_score_weight: p.overlap_score_weight,
            temperature: p.temperature,
        };
        let d = match self.policy {
            KvPolicy::Cost => select_kv(&req, &candidates, rng)?,
            KvPolicy::Sticky { spill, stake } => {
                let home = local.first().map_or(0, |h| h.0);
                crate::sticky::select_sticky(&req, &candidates, home, spill, stake)?
            }
        };
        Ok(Plan {
            worker: d.worker,
            overlap_blocks: d.overlap_blocks,
            isl,
            decision: Some(d),
            seq_hashes,
        })
    }

    /// Stages 4–5 of the load-blind modes: `round-robin` (advancing
    /// `counter`) or `random` over the ranks, in their order.
    pub fn select_plain<R: Rng + ?Sized>(
        &self,
        mode: RouterMode,
        isl: usize,
        ranks: Vec<WorkerKey>,
        busy: &HashSet<WorkerId>,
        counter: &mut usize,
        rng: &mut R,
    ) -> Result<Plan, SelectionError> {
        let candidates = ranks
            .into_iter()
            .map(|worker| Candidate {
                worker,
                overlap_blocks: 0,
                tree_size: 0,
                prefill_tokens: 0,
                decode_blocks: 0,
            })
            .collect();
        let ranks = without_busy(candidates, busy)?;
        let i = match mode {
            RouterMode::Random => select_random(ranks.len(), rng)?,
            _ => select_round_robin(counter, ranks.len())?,
        };
        Ok(Plan {
            worker: ranks[i].worker,
            overlap_blocks: 0,
            isl,
            decision: None,
            seq_hashes: None,
        })
    }

    /// Stage 6: the request is sent. An index without events learns where
    /// the prompt went; the tracker starts counting its load.
    #[allow(clippy::too_many_arguments)]
    pub fn commit(
        &self,
        index: &dyn KvIndex,
        tracker: &mut SequenceTracker,
        id: &str,
        local: &[LocalBlockHash],
        plan: &Plan,
        expected_output_tokens: Option<u32>,
        now: Instant,
    ) -> Result<(), SequenceError> {
        index.learn_routing(plan.worker, local, now);
        tracker.add_request(
            plan.worker,
            NewRequest {
                id,
                seq_hashes: plan.seq_hashes.as_deref(),
                isl: plan.isl,
                overlap: plan.overlap_blocks,
                expected_output_tokens,
            },
            now,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::index_for;
    use crate::protocols::{KvCacheEvent, KvCacheEventData, KvCacheStoreData};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn tracker(ranks: &[WorkerKey]) -> SequenceTracker {
        let mut t = SequenceTracker::new(4);
        for &w in ranks {
            t.add_worker(w);
        }
        t
    }

    #[test]
    fn kv_plan_follows_the_cache_and_commit_adds_load() {
        let cfg = KvRouterConfig::default();
        let p = Pipeline::new(4, cfg.clone());
        let index = index_for(&cfg);
        let tokens: Vec<u32> = (0..16).collect();
        let local = p.block_hashes(&tokens);
        let stored = KvCacheStoreData::root_chain(&local, &crate::hash::sequence_hashes(&local));
        let ev = crate::RouterEvent::new(
            2,
            KvCacheEvent {
                event_id: 1,
                data: KvCacheEventData::Stored(stored),
                dp_rank: 0,
            },
        );
        index.apply_event(&ev, Instant::now()).unwrap();
        let (a, b) = (WorkerKey::new(1, 0), WorkerKey::new(2, 0));
        let mut t = tracker(&[a, b]);
        let mut rng = StdRng::seed_from_u64(1);
        let params = p.params(None);
        let overlaps = p.lookup(index.as_ref(), &local, Instant::now());
        let hashes = p.tracking_hashes(&local, &params, &mut rng);
        let none = HashSet::new();
        let filter = RankFilter {
            allowed: None,
            busy: &none,
        };
        let plan = p
            .select_kv(16, &local, &params, hashes, &overlaps, &t, filter, &mut rng)
            .unwrap();
        assert_eq!((plan.worker, plan.overlap_blocks), (b, 4));
        p.commit(
            index.as_ref(),
            &mut t,
            "r",
            &local,
            &plan,
            None,
            Instant::now(),
        )
        .unwrap();
        assert_eq!(t.get(b).unwrap().num_requests(), 1);

        // Pinned away from the cache, the plan goes where it is allowed.
        let only_a = |w: WorkerKey| w == a;
        let filter = RankFilter {
            allowed: Some(&only_a),
            busy: &none,
        };
        let plan = p
            .select_kv(16, &local, &params, None, &overlaps, &t, filter, &mut rng)
            .unwrap();
        assert_eq!((plan.worker, plan.overlap_blocks), (a, 0));

        // Busy everywhere allowed is its own error.
        let busy: HashSet<WorkerId> = [1].into();
        let filter = RankFilter {
            allowed: Some(&only_a),
            busy: &busy,
        };
        let e = p.select_kv(16, &local, &params, None, &overlaps, &t, filter, &mut rng);
        assert_eq!(e, Err(SelectionError::AllWorkersBusy));
    }

    #[test]
    fn plain_modes_rotate_and_skip_busy() {
        let p = Pipeline::new(4, KvRouterConfig::default());
        let ranks = vec![
            WorkerKey::new(1, 0),
            WorkerKey::new(2, 0),
            WorkerKey::new(3, 0),
        ];
        let (mut rr, mut rng) = (0, StdRng::seed_from_u64(1));
        let none = HashSet::new();
        let picks: Vec<u64> = (0..4)
            .map(|_| {
                p.select_plain(
                    RouterMode::RoundRobin,
                    8,
                    ranks.clone(),
                    &none,
                    &mut rr,
                    &mut rng,
                )
                .unwrap()
                .worker
                .worker_id
            })
            .collect();
        assert_eq!(picks, [1, 2, 3, 1]);
        let busy: HashSet<WorkerId> = [1, 2, 3].into();
        let e = p.select_plain(RouterMode::Random, 8, ranks, &busy, &mut rr, &mut rng);
        assert_eq!(e, Err(SelectionError::AllWorkersBusy));
        let e = p.select_plain(RouterMode::Random, 8, vec![], &none, &mut rr, &mut rng);
        assert_eq!(e, Err(SelectionError::NoWorkers));
    }
}
