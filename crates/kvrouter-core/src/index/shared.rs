//! Every form of the index behind one trait, [`KvIndex`], callable from any
//! thread: the live router holds a `Box<dyn KvIndex>` chosen once from its
//! configuration, and the simulator holds the same forms, so neither matches on
//! which index it has.
//!
//! Each implementation keeps its own locking: the exact and approximate
//! indexes sit behind one short-held mutex, while the threaded index applies
//! events on its writer threads and answers lookups from the shared shards
//! without taking the writer's lock.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::{ApproxIndex, KvCacheEventError, RadixIndex, ShardedIndex, ThreadedIndex};
use crate::KvRouterConfig;
use crate::hash::{LocalBlockHash, sequence_hashes};
use crate::protocols::{OverlapScores, RouterEvent, WorkerId, WorkerKey};

/// What the router needs of a prefix index.
pub trait KvIndex: Send + Sync {
    /// Applies one worker event. The threaded index only queues it (its
    /// outcome is counted by the writer thread) and answers `Ok`.
    fn apply_event(&self, ev: &RouterEvent, now: Instant) -> Result<(), KvCacheEventError>;
    /// Which ranks cache how much of the prompt's leading blocks.
    fn find_matches(&self, local: &[LocalBlockHash], now: Instant) -> OverlapScores;
    /// A request was sent to `worker`: an index without events learns from it.
    fn learn_routing(&self, _worker: WorkerKey, _local: &[LocalBlockHash], _now: Instant) {}
    /// Forgets a worker entirely.
    fn remove_worker(&self, id: WorkerId);
    /// Forgets one rank's blocks (its engine restarted or its history was lost).
    fn reset_rank(&self, key: WorkerKey);
    /// Every cached block, as events.
    fn dump_events(&self) -> Vec<RouterEvent>;
    /// Blocks held, over all ranks.
    fn current_size(&self) -> usize;
    /// Blocks one rank holds, where the index can say cheaply.
    fn worker_size(&self, _key: WorkerKey) -> Option<usize> {
        None
    }
    /// Events that were not fully applied so far.
    fn event_errors(&self) -> u64;
}

/// The index a router configuration asks for: approximate without KV events,
/// threaded with more than one event thread, exact otherwise.
pub fn index_for(config: &KvRouterConfig) -> Box<dyn KvIndex> {
    if !config.use_kv_events {
        Box::new(Mutex::new(ApproxIndex::new(config.prune_config())))
    } else if config.router_event_threads > 1 {
        Box::new(ConcurrentIndex::new(config.router_event_threads as usize))
    } else {
        Box::new(Mutex::new(RadixIndex::new()))
    }
}

impl KvIndex for Mutex<RadixIndex> {
    fn apply_event(&self, ev: &RouterEvent, _now: Instant) -> Result<(), KvCacheEventError> {
        self.lock().apply_event(ev)
    }
    fn find_matches(&self, local: &[LocalBlockHash], _now: Instant) -> OverlapScores {
        self.lock().find_matches(local)
    }
    fn remove_worker(&self, id: WorkerId) {
        self.lock().remove_worker(id);
    }
    fn reset_rank(&self, key: WorkerKey) {
        self.lock().remove_worker_rank(key);
    }
    fn dump_events(&self) -> Vec<RouterEvent> {
        self.lock().dump_events()
    }
    fn current_size(&self) -> usize {
        self.lock().current_size()
    }
    fn worker_size(&self, key: WorkerKey) -> Option<usize> {
        Some(self.lock().worker_size(key))
    }
    fn event_errors(&self) -> u64 {
        self.lock().stats().errors()
    }
}

impl KvIndex for Mutex<ApproxIndex> {
    fn apply_event(&self, ev: &RouterEvent, now: Instant) -> Result<(), KvCacheEventError> {
        self.lock().apply_event(ev, now)
    }
    fn find_matches(&self, local: &[LocalBlockHash], now: Instant) -> OverlapScores {
        let mut i = self.lock();
        i.expire(now);
        i.find_matches(local)
    }
    fn learn_routing(&self, worker: WorkerKey, local: &[LocalBlockHash], now: Instant) {
        let seq = sequence_hashes(local);
        self.lock()
            .process_routing_decision(worker, local, &seq, now);
    }
    fn remove_worker(&self, id: WorkerId) {
        self.lock().remove_worker(id);
    }
    fn reset_rank(&self, key: WorkerKey) {
        // The approximate tree learns per worker, not per rank.
        self.lock().remove_worker(key.worker_id);
    }
    fn dump_events(&self) -> Vec<RouterEvent> {
        self.lock().tree().dump_events()
    }
    fn current_size(&self) -> usize {
        self.lock().current_size()
    }
    fn worker_size(&self, key: WorkerKey) -> Option<usize> {
        Some(self.lock().tree().worker_size(key))
    }
    fn event_errors(&self) -> u64 {
        self.lock().tree().stats().errors()
    }
}

/// The threaded index with its writer behind a lock of its own, so lookups
/// read the shards directly and never wait on event submission.
pub struct ConcurrentIndex {
    writer: Mutex<ThreadedIndex>,
    reader: Arc<ShardedIndex>,
}

impl ConcurrentIndex {
    /// Starts `threads` writer threads.
    pub fn new(threads: usize) -> Self {
        let writer = ThreadedIndex::new(threads);
        let reader = writer.index().clone();
        Self {
            writer: Mutex::new(writer),
            reader,
        }
    }

    /// Applies what was submitted before reading state that must include it.
    fn flushed(&self) -> &ShardedIndex {
        self.writer.lock().flush();
        &self.reader
    }
}

impl KvIndex for ConcurrentIndex {
    fn apply_event(&self, ev: &RouterEvent, _now: Instant) -> Result<(), KvCacheEventError> {
        self.writer.lock().submit(ev.clone());
        Ok(())
    }
    fn find_matches(&self, local: &[LocalBlockHash], _now: Instant) -> OverlapScores {
        self.reader.find_matches(local)
    }
    fn remove_worker(&self, id: WorkerId) {
        self.flushed().remove_worker(id);
    }
    fn reset_rank(&self, key: WorkerKey) {
        self.flushed().remove_worker_rank(key);
    }
    fn dump_events(&self) -> Vec<RouterEvent> {
        self.flushed().dump_events()
    }
    fn current_size(&self) -> usize {
        self.flushed().current_size()
    }
    fn event_errors(&self) -> u64 {
        self.flushed().stats().errors()
    }
}
