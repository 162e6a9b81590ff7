//! The approximate index, for routers that receive no KV events.
//!
//! Without events the router assumes that a worker caches what it was just
//! sent: each routing decision inserts the request's blocks for the chosen
//! worker. Those guesses age out after a TTL (refreshed whenever a later
//! decision touches the same block), and when the index holds more than
//! `max_tree_size` blocks it is pruned down to `max_tree_size ×
//! prune_target_ratio`, earliest expiry first and, among equal expiries, the
//! deepest block first, so chains shrink from their leaves. Expiry is lazy: a
//! heap of deadlines is checked against the authoritative timer map, and the
//! heap is rebuilt when stale entries outnumber live ones fifty to one.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::{KvCacheEventError, RadixIndex};
use crate::fast_hash::IntMap;
use crate::hash::{LocalBlockHash, SequenceHash};
use crate::protocols::{KvCacheEventData, OverlapScores, RouterEvent, WorkerId, WorkerKey};

/// Heap entries per live timer before the heap is rebuilt.
const HEAP_REBUILD_FACTOR: usize = 50;

/// TTL and size cap of the approximate index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PruneConfig {
    /// How long an inserted block is assumed cached (`router_ttl_secs`, default 120 s).
    pub ttl: Duration,
    /// Blocks held before pruning (`router_max_tree_size`, default 2^20).
    pub max_tree_size: usize,
    /// Fraction of the cap to prune down to (`router_prune_target_ratio`, default 0.8).
    pub prune_target_ratio: f64,
}

impl Default for PruneConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(120),
            max_tree_size: 1 << 20,
            prune_target_ratio: 0.8,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timer {
    expiry: Instant,
    position: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Deadline {
    timer: Timer,
    worker: WorkerKey,
    block: u64,
}

impl Ord for Deadline {
    /// The max-heap's top is the earliest expiry, then the deepest position.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .timer
            .expiry
            .cmp(&self.timer.expiry)
            .then(self.timer.position.cmp(&other.timer.position))
            .then(self.worker.cmp(&other.worker))
            .then(self.block.cmp(&other.block))
    }
}

impl PartialOrd for Deadline {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// An index fed by routing decisions, with TTL expiry and size pruning.
#[derive(Debug)]
pub struct ApproxIndex {
    tree: RadixIndex,
    config: PruneConfig,
    timers: IntMap<(WorkerKey, u64), Timer>,
    heap: BinaryHeap<Deadline>,
}

impl ApproxIndex {
    /// An empty approximate index.
    pub fn new(config: PruneConfig) -> Self {
        Self {
            tree: RadixIndex::new(),
            config,
            timers: IntMap::default(),
            heap: BinaryHeap::new(),
        }
    }

    /// Records that `worker` was sent a request with these block hashes at `now`.
    ///
    /// `seq` are the rolling sequence hashes of `local` (same length); they
    /// identify the blocks, as an engine's own hashes would.
    pub fn process_routing_decision(
        &mut self,
        worker: WorkerKey,
        local: &[LocalBlockHash],
        seq: &[SequenceHash],
        now: Instant,
    ) {
        let n = local.len().min(seq.len());
        // Sequence hashes of one chain are distinct unless xxh3 collides; if it
        // does, the chain is simply not recorded.
        if self
            .tree
            .store(worker, None, n, |i| (seq[i].0, local[i].0))
            .is_err()
        {
            return;
        }
        for (position, h) in seq[..n].iter().enumerate() {
            self.arm(worker, h.0, position, now);
        }
        self.prune_if_needed();
    }

    /// Applies a real KV event too (when some workers do publish them).
    pub fn apply_event(&mut self, ev: &RouterEvent, now: Instant) -> Result<(), KvCacheEventError> {
        let result = self.tree.apply_event(ev);
        let worker = ev.worker_key();
        match &ev.event.data {
            KvCacheEventData::Stored(s) if result.is_ok() => {
                for (position, b) in s.blocks.iter().enumerate() {
                    self.arm(worker, b.block_hash.0, position, now);
                }
                self.prune_if_needed();
            }
            KvCacheEventData::Removed(r) => {
                for h in &r.block_hashes {
                    self.timers.remove(&(worker, h.0));
                }
            }
            KvCacheEventData::Cleared => self.forget_timers(ev.worker_id),
            _ => {}
        }
        result
    }

    /// Removes every block whose TTL ran out by `now`; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut removed = 0;
        while let Some(top) = self.heap.peek() {
            if top.timer.expiry > now {
                break;
            }
            let d = self.heap.pop().expect("peeked");
            if self.take_if_current(&d) {
                removed += 1;
            }
        }
        removed
    }

    /// The earliest pending deadline (possibly of an already refreshed block).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.heap.peek().map(|d| d.timer.expiry)
    }

    /// Lookup, as [`RadixIndex::find_matches`].
    pub fn find_matches(&self, seq: &[LocalBlockHash]) -> OverlapScores {
        self.tree.find_matches(seq)
    }

    /// Forgets a worker and its timers.
    pub fn remove_worker(&mut self, worker_id: WorkerId) {
        self.tree.remove_worker(worker_id);
        self.forget_timers(worker_id);
    }

    /// Blocks held, summed over workers.
    pub fn current_size(&self) -> usize {
        self.tree.current_size()
    }

    /// The underlying exact tree.
    pub fn tree(&self) -> &RadixIndex {
        &self.tree
    }

    /// The configuration.
    pub fn config(&self) -> PruneConfig {
        self.config
    }

    fn arm(&mut self, worker: WorkerKey, block: u64, position: usize, now: Instant) {
        let timer = Timer {
            expiry: now + self.config.ttl,
            position,
        };
        self.timers.insert((worker, block), timer);
        self.heap.push(Deadline {
            timer,
            worker,
            block,
        });
        if self.heap.len() > self.timers.len().max(1) * HEAP_REBUILD_FACTOR {
            self.heap = self
                .timers
                .iter()
                .map(|(&(worker, block), &timer)| Deadline {
                    timer,
                    worker,
                    block,
                })
                .collect();
        }
    }

    /// Removes the block behind `d` if `d` is its current deadline.
    fn take_if_current(&mut self, d: &Deadline) -> bool {
        let key = (d.worker, d.block);
        if self.timers.get(&key) != Some(&d.timer) {
            return false;
        }
        self.timers.remove(&key);
        self.tree.remove(d.worker, [d.block]).is_ok()
    }

    fn prune_if_needed(&mut self) {
        if self.tree.current_size() <= self.config.max_tree_size {
            return;
        }
        let target = (self.config.max_tree_size as f64 * self.config.prune_target_ratio) as usize;
        while self.tree.current_size() > target {
            let Some(d) = self.heap.pop() else { break };
            self.take_if_current(&d);
        }
    }

    fn forget_timers(&mut self, worker_id: WorkerId) {
        self.timers.retain(|(w, _), _| w.worker_id != worker_id);
    }
}
