//! Busy detection: which workers are too loaded to take another request.
//!
//! A rank is overloaded when any configured check holds: its queued prefill
//! tokens exceed `active_prefill_tokens_threshold`, or exceed
//! `floor(active_prefill_tokens_threshold_frac × max_num_batched_tokens)`, or its
//! decode load exceeds `active_decode_blocks_threshold × total_kv_blocks`. The
//! decode check looks at two signals, the blocks the worker says are in use and
//! the blocks the router predicts, and trips when either is over; it clears only
//! when the latest value of both is at or below the line (a latch between the
//! two feeds). A worker is busy when all its ranks are overloaded; a rank never
//! observed counts as free. Thresholds can change at run time; unset checks are
//! skipped, so by default nothing is ever busy.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::protocols::{ActiveLoad, WorkerId, WorkerKey};

/// `max_num_batched_tokens` assumed for workers that do not report one (so the
/// fractional check effectively never trips for them).
pub const DEFAULT_MAX_BATCHED_TOKENS: u64 = 10_000_000;

/// The busy thresholds; `None` skips a check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadThresholds {
    /// Fraction of `total_kv_blocks` (in [0, 1]).
    pub active_decode_blocks_threshold: Option<f64>,
    /// Absolute queued prefill tokens.
    pub active_prefill_tokens_threshold: Option<u64>,
    /// Fraction of `max_num_batched_tokens` (≥ 0, may exceed 1).
    pub active_prefill_tokens_threshold_frac: Option<f64>,
}

impl LoadThresholds {
    /// Problems with the values.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        if let Some(d) = self.active_decode_blocks_threshold
            && !(d.is_finite() && (0.0..=1.0).contains(&d))
        {
            errs.push(ConfigError {
                fields: vec!["active_decode_blocks_threshold"],
                message: format!("must be in [0, 1], got {d}"),
            });
        }
        if let Some(f) = self.active_prefill_tokens_threshold_frac
            && !(f.is_finite() && f >= 0.0)
        {
            errs.push(ConfigError {
                fields: vec!["active_prefill_tokens_threshold_frac"],
                message: format!("must be a finite number ≥ 0, got {f}"),
            });
        }
        errs
    }

    /// Whether any check is configured.
    pub fn any(&self) -> bool {
        self.active_decode_blocks_threshold.is_some()
            || self.active_prefill_tokens_threshold.is_some()
            || self.active_prefill_tokens_threshold_frac.is_some()
    }
}

/// What a worker declared about its capacity (from discovery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerCapacity {
    /// KV blocks per rank.
    pub total_kv_blocks: u64,
    /// Tokens per forward pass, if known.
    pub max_num_batched_tokens: Option<u64>,
    /// Data-parallel ranks (at least 1).
    pub data_parallel_size: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct RankLoad {
    prefill_tokens: Option<u64>,
    predicted_decode_blocks: Option<u64>,
    worker_kv_used_blocks: Option<u64>,
}

/// Tracks load per rank and answers "is this worker busy?".
#[derive(Debug, Clone, Default)]
pub struct BusyMonitor {
    thresholds: LoadThresholds,
    capacity: HashMap<WorkerId, WorkerCapacity>,
    ranks: HashMap<WorkerKey, RankLoad>,
}

impl BusyMonitor {
    /// A monitor with these thresholds.
    pub fn new(thresholds: LoadThresholds) -> Self {
        Self {
            thresholds,
            ..Self::default()
        }
    }

    /// The thresholds in force.
    pub fn thresholds(&self) -> LoadThresholds {
        self.thresholds
    }

    /// Replaces the thresholds (validated by the caller).
    pub fn set_thresholds(&mut self, t: LoadThresholds) {
        self.thresholds = t;
    }

    /// Declares (or updates) a worker.
    pub fn add_worker(&mut self, worker_id: WorkerId, capacity: WorkerCapacity) {
        self.capacity.insert(worker_id, capacity);
    }

    /// Forgets a worker and its load.
    pub fn remove_worker(&mut self, worker_id: WorkerId) {
        self.capacity.remove(&worker_id);
        self.ranks.retain(|k, _| k.worker_id != worker_id);
    }

    /// A load report published by a worker (or a peer router).
    pub fn observe(&mut self, load: &ActiveLoad) {
        let r = self
            .ranks
            .entry(WorkerKey::new(load.worker_id, load.dp_rank))
            .or_default();
        if load.active_prefill_tokens.is_some() {
            r.prefill_tokens = load.active_prefill_tokens;
        }
        if load.active_decode_blocks.is_some() {
            r.predicted_decode_blocks = load.active_decode_blocks;
        }
        if load.kv_used_blocks.is_some() {
            r.worker_kv_used_blocks = load.kv_used_blocks;
        }
    }

    /// The router's own view of a rank after a routing decision or a free.
    pub fn observe_router(&mut self, worker: WorkerKey, prefill_tokens: u64, decode_blocks: u64) {
        let r = self.ranks.entry(worker).or_default();
        r.prefill_tokens = Some(prefill_tokens);
        r.predicted_decode_blocks = Some(decode_blocks);
    }

    /// Whether one rank is over any configured threshold.
    pub fn rank_overloaded(&self, key: WorkerKey) -> bool {
        let Some(load) = self.ranks.get(&key) else {
            return false;
        };
        let cap = self.capacity.get(&key.worker_id);
        let t = &self.thresholds;
        if let (Some(limit), Some(p)) = (t.active_prefill_tokens_threshold, load.prefill_tokens)
            && p > limit
        {
            return true;
        }
        if let (Some(frac), Some(p)) = (t.active_prefill_tokens_threshold_frac, load.prefill_tokens)
        {
            let max = cap
                .and_then(|c| c.max_num_batched_tokens)
                .unwrap_or(DEFAULT_MAX_BATCHED_TOKENS);
            if p > (frac * max as f64).floor() as u64 {
                return true;
            }
        }
        if let (Some(frac), Some(c)) = (t.active_decode_blocks_threshold, cap)
            && c.total_kv_blocks > 0
        {
            let line = frac * c.total_kv_blocks as f64;
            let over = |v: Option<u64>| v.is_some_and(|v| v as f64 > line);
            if over(load.worker_kv_used_blocks) || over(load.predicted_decode_blocks) {
                return true;
            }
        }
        false
    }

    /// Whether every declared rank of the worker is overloaded.
    pub fn worker_busy(&self, worker_id: WorkerId) -> bool {
        let ranks = self
            .capacity
            .get(&worker_id)
            .map_or(1, |c| c.data_parallel_size.max(1));
        (0..ranks).all(|r| self.rank_overloaded(WorkerKey::new(worker_id, r)))
    }

    /// Busy workers among the declared ones.
    pub fn busy_workers(&self) -> HashSet<WorkerId> {
        if !self.thresholds.any() {
            return HashSet::new();
        }
        self.capacity
            .keys()
            .copied()
            .filter(|&w| self.worker_busy(w))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(total: u64, max_batched: Option<u64>, dp: u32) -> WorkerCapacity {
        WorkerCapacity {
            total_kv_blocks: total,
            max_num_batched_tokens: max_batched,
            data_parallel_size: dp,
        }
    }

    fn load(
        w: u64,
        dp: u32,
        decode: Option<u64>,
        prefill: Option<u64>,
        used: Option<u64>,
    ) -> ActiveLoad {
        ActiveLoad {
            worker_id: w,
            dp_rank: dp,
            active_decode_blocks: decode,
            active_prefill_tokens: prefill,
            kv_used_blocks: used,
        }
    }

    #[test]
    fn nothing_is_busy_without_thresholds() {
        let mut m = BusyMonitor::default();
        m.add_worker(1, cap(100, Some(1000), 1));
        m.observe(&load(1, 0, Some(100), Some(1_000_000), Some(100)));
        assert!(m.busy_workers().is_empty());
    }

    #[test]
    fn prefill_thresholds_absolute_and_fractional() {
        let mut m = BusyMonitor::new(LoadThresholds {
            active_prefill_tokens_threshold: Some(500),
            ..Default::default()
        });
        m.add_worker(1, cap(100, Some(1000), 1));
        m.observe_router(WorkerKey::new(1, 0), 500, 0);
        assert!(!m.worker_busy(1), "at the threshold is not over it");
        m.observe_router(WorkerKey::new(1, 0), 501, 0);
        assert!(m.worker_busy(1));
        m.set_thresholds(LoadThresholds {
            active_prefill_tokens_threshold_frac: Some(1.5),
            ..Default::default()
        });
        assert!(!m.worker_busy(1), "1.5 × 1000 = 1500");
        m.observe_router(WorkerKey::new(1, 0), 1501, 0);
        assert!(m.worker_busy(1));
        // Without a reported max_num_batched_tokens the default 10M applies.
        m.add_worker(2, cap(100, None, 1));
        m.observe_router(WorkerKey::new(2, 0), 1_000_000, 0);
        assert!(!m.worker_busy(2));
    }

    #[test]
    fn decode_latch_needs_both_signals_to_clear() {
        let mut m = BusyMonitor::new(LoadThresholds {
            active_decode_blocks_threshold: Some(0.5),
            ..Default::default()
        });
        m.add_worker(1, cap(100, None, 1));
        m.observe(&load(1, 0, None, None, Some(60)));
        assert!(m.worker_busy(1), "worker-reported usage over the line");
        m.observe_router(WorkerKey::new(1, 0), 0, 10);
        assert!(
            m.worker_busy(1),
            "router's low prediction does not clear it"
        );
        m.observe(&load(1, 0, None, None, Some(50)));
        assert!(!m.worker_busy(1), "both at or below: cleared");
        m.observe_router(WorkerKey::new(1, 0), 0, 51);
        assert!(m.worker_busy(1), "router prediction alone trips it");
    }

    #[test]
    fn a_worker_is_busy_only_when_all_ranks_are() {
        let mut m = BusyMonitor::new(LoadThresholds {
            active_prefill_tokens_threshold: Some(10),
            ..Default::default()
        });
        m.add_worker(1, cap(100, None, 2));
        m.observe_router(WorkerKey::new(1, 0), 11, 0);
        assert!(!m.worker_busy(1), "rank 1 never observed: free");
        m.observe_router(WorkerKey::new(1, 1), 11, 0);
        assert!(m.worker_busy(1));
        assert_eq!(m.busy_workers(), [1].into_iter().collect());
        m.remove_worker(1);
        assert!(m.busy_workers().is_empty());
    }

    #[test]
    fn validation() {
        let bad = LoadThresholds {
            active_decode_blocks_threshold: Some(1.5),
            active_prefill_tokens_threshold: None,
            active_prefill_tokens_threshold_frac: Some(-1.0),
        };
        assert_eq!(bad.validate().len(), 2);
        assert!(LoadThresholds::default().validate().is_empty());
    }
}
