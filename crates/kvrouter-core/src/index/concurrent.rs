//! The exact index for `router_event_threads > 1`: sharded by worker.
//!
//! Every worker is assigned (sticky, round-robin on first sight) to one of N
//! shards, each a plain [`RadixIndex`] behind its own reader-writer lock. All
//! of a worker's events land on its shard, so per-worker order is kept and a
//! `cleared` never spans shards; writers of different shards never contend. A
//! lookup reads each shard in turn and concatenates the answers: shards hold
//! disjoint workers, so per-worker overlaps are exact. [`ThreadedIndex`] adds
//! one writer thread per shard, fed by a channel, and a `flush` that waits
//! until everything submitted is applied (a quiescent point).
//!
//! The trade-off: a lookup walks the prompt once per shard, so it costs about N
//! times a single-threaded lookup, in exchange for N-way parallel writes and
//! lock hold times of one event.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use parking_lot::RwLock;

use super::{EventStats, KvCacheEventError, RadixIndex};
use crate::fast_hash::IntMap;
use crate::hash::LocalBlockHash;
use crate::protocols::{OverlapScores, RouterEvent, WorkerId, WorkerKey};

/// N exact indexes, one per group of workers, each behind its own lock.
#[derive(Debug)]
pub struct ShardedIndex {
    shards: Vec<RwLock<RadixIndex>>,
    assignment: RwLock<IntMap<WorkerId, usize>>,
    next: AtomicUsize,
}

impl ShardedIndex {
    /// An empty index of `shards` shards (at least one).
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1))
                .map(|_| RwLock::new(RadixIndex::new()))
                .collect(),
            assignment: RwLock::new(IntMap::default()),
            next: AtomicUsize::new(0),
        }
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard owning `worker_id`, assigning one on first sight.
    pub fn shard_of(&self, worker_id: WorkerId) -> usize {
        if let Some(&s) = self.assignment.read().get(&worker_id) {
            return s;
        }
        let mut map = self.assignment.write();
        *map.entry(worker_id)
            .or_insert_with(|| self.next.fetch_add(1, Ordering::Relaxed) % self.shards.len())
    }

    /// Applies one event on its worker's shard.
    pub fn apply_event(&self, ev: &RouterEvent) -> Result<(), KvCacheEventError> {
        self.shards[self.shard_of(ev.worker_id)]
            .write()
            .apply_event(ev)
    }

    /// Lookup over every shard.
    pub fn find_matches(&self, seq: &[LocalBlockHash]) -> OverlapScores {
        let mut out = OverlapScores::default();
        for shard in &self.shards {
            let part = shard.read().find_matches(seq);
            out.scores.extend(part.scores);
        }
        out
    }

    /// Forgets a worker.
    pub fn remove_worker(&self, worker_id: WorkerId) {
        let shard = self.assignment.read().get(&worker_id).copied();
        if let Some(s) = shard {
            self.shards[s].write().remove_worker(worker_id);
        }
    }

    /// Forgets one rank of a worker.
    pub fn remove_worker_rank(&self, key: WorkerKey) {
        let shard = self.assignment.read().get(&key.worker_id).copied();
        if let Some(s) = shard {
            self.shards[s].write().remove_worker_rank(key);
        }
    }

    /// Blocks held, summed over workers.
    pub fn current_size(&self) -> usize {
        self.shards.iter().map(|s| s.read().current_size()).sum()
    }

    /// Event counts of all shards.
    pub fn stats(&self) -> EventStats {
        let mut total = EventStats::default();
        for s in &self.shards {
            total.merge(s.read().stats());
        }
        total
    }

    /// Every worker rank known, in increasing order.
    pub fn workers(&self) -> Vec<WorkerKey> {
        let mut v: Vec<_> = self
            .shards
            .iter()
            .flat_map(|s| s.read().workers())
            .collect();
        v.sort_unstable();
        v
    }

    /// Dump of every shard (see [`RadixIndex::dump_events`]), renumbered.
    pub fn dump_events(&self) -> Vec<RouterEvent> {
        let mut all: Vec<RouterEvent> = self
            .shards
            .iter()
            .flat_map(|s| s.read().dump_events())
            .collect();
        for (i, ev) in all.iter_mut().enumerate() {
            ev.event.event_id = i as u64;
        }
        all
    }
}

struct Writer {
    tx: Option<mpsc::Sender<RouterEvent>>,
    handle: Option<JoinHandle<()>>,
    submitted: u64,
    applied: Arc<AtomicU64>,
}

/// A [`ShardedIndex`] with one writer thread per shard.
pub struct ThreadedIndex {
    index: Arc<ShardedIndex>,
    writers: Vec<Writer>,
}

impl ThreadedIndex {
    /// Starts `threads` writer threads (at least one).
    pub fn new(threads: usize) -> Self {
        let index = Arc::new(ShardedIndex::new(threads));
        let writers = (0..index.shard_count())
            .map(|shard| {
                let (tx, rx) = mpsc::channel::<RouterEvent>();
                let applied = Arc::new(AtomicU64::new(0));
                let (idx, done) = (index.clone(), applied.clone());
                let handle = std::thread::Builder::new()
                    .name(format!("kv-index-{shard}"))
                    .spawn(move || {
                        for ev in rx {
                            // Outcomes are counted in the shard's stats.
                            let _ = idx.shards[shard].write().apply_event(&ev);
                            done.fetch_add(1, Ordering::Release);
                        }
                    })
                    .expect("spawn index writer thread");
                Writer {
                    tx: Some(tx),
                    handle: Some(handle),
                    submitted: 0,
                    applied,
                }
            })
            .collect();
        Self { index, writers }
    }

    /// Queues an event on its worker's writer thread.
    pub fn submit(&mut self, ev: RouterEvent) {
        let shard = self.index.shard_of(ev.worker_id);
        let w = &mut self.writers[shard];
        w.submitted += 1;
        w.tx.as_ref()
            .expect("writer open until drop")
            .send(ev)
            .expect("index writer thread alive");
    }

    /// Waits until every submitted event is applied.
    pub fn flush(&self) {
        for w in &self.writers {
            let mut spins = 0u32;
            while w.applied.load(Ordering::Acquire) < w.submitted {
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }

    /// The shared index, for lookups from any thread.
    pub fn index(&self) -> &Arc<ShardedIndex> {
        &self.index
    }
}

impl Drop for ThreadedIndex {
    fn drop(&mut self) {
        for w in &mut self.writers {
            w.tx.take();
        }
        for w in &mut self.writers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}
