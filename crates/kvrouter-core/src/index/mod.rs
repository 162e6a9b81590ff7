//! The KV prefix index: which worker caches which prefix of a prompt.
//!
//! - [`RadixIndex`]: the exact index, fed by the workers' KV events.
//! - [`ApproxIndex`]: for routers without KV events; the router's own routing
//!   decisions insert blocks, which expire after a TTL and are pruned when the
//!   index outgrows its cap.
//! - [`ShardedIndex`] / [`ThreadedIndex`]: the exact index split by worker over
//!   N shards, written by N threads (each worker's events in order on one
//!   thread) while lookups run from any thread.
//!
//! - [`KvIndex`]: all of the above behind one thread-safe trait, picked once
//!   from the configuration by [`index_for`].
//!
//! All of them answer [`RadixIndex::find_matches`]-style lookups with
//! [`crate::OverlapScores`] and count every event by kind and outcome in
//! [`EventStats`], the source of `dynamo_kvrouter_kv_cache_events_applied`.

mod approx;
mod concurrent;
mod radix;
mod shared;
mod worker_blocks;
mod worker_set;

pub use approx::{ApproxIndex, PruneConfig};
pub use concurrent::{ShardedIndex, ThreadedIndex};
pub use radix::RadixIndex;
pub use shared::{ConcurrentIndex, KvIndex, index_for};

/// Why an event was not (fully) applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KvCacheEventError {
    /// A stored event names a parent the worker does not cache; the event was skipped.
    #[error("parent block not found")]
    ParentBlockNotFound,
    /// A removed event names a block the worker does not cache; the others were removed.
    #[error("block not found")]
    BlockNotFound,
    /// A stored chain repeats a block hash (a block would be its own ancestor); skipped.
    #[error("invalid block sequence")]
    InvalidBlockSequence,
}

/// The kind of an event, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// `stored`
    Stored,
    /// `removed`
    Removed,
    /// `cleared`
    Cleared,
}

impl EventKind {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            EventKind::Stored => "stored",
            EventKind::Removed => "removed",
            EventKind::Cleared => "cleared",
        }
    }
}

/// Outcome labels, indexed as [`EventStats`] stores them.
pub const STATUS_LABELS: [&str; 4] = [
    "ok",
    "parent_block_not_found",
    "block_not_found",
    "invalid_block",
];

/// The metric label of an event's outcome (`ok`, `parent_block_not_found`, …).
pub fn status_label(result: Result<(), KvCacheEventError>) -> &'static str {
    STATUS_LABELS[status_index(result)]
}

fn status_index(result: Result<(), KvCacheEventError>) -> usize {
    match result {
        Ok(()) => 0,
        Err(KvCacheEventError::ParentBlockNotFound) => 1,
        Err(KvCacheEventError::BlockNotFound) => 2,
        Err(KvCacheEventError::InvalidBlockSequence) => 3,
    }
}

/// Event counts by kind and outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventStats {
    counts: [[u64; 4]; 3],
}

impl EventStats {
    /// Counts one event.
    pub fn record(&mut self, kind: EventKind, result: Result<(), KvCacheEventError>) {
        self.counts[kind as usize][status_index(result)] += 1;
    }

    /// Events of `kind` with outcome `result`.
    pub fn get(&self, kind: EventKind, result: Result<(), KvCacheEventError>) -> u64 {
        self.counts[kind as usize][status_index(result)]
    }

    /// Events that were not (fully) applied.
    pub fn errors(&self) -> u64 {
        self.counts.iter().map(|c| c[1..].iter().sum::<u64>()).sum()
    }

    /// All events.
    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// Adds another set of counts.
    pub fn merge(&mut self, other: &EventStats) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            for (x, y) in a.iter_mut().zip(b.iter()) {
                *x += y;
            }
        }
    }

    /// `(event_type, status, count)` for every non-zero count, metric-label ready.
    pub fn labelled(&self) -> Vec<(&'static str, &'static str, u64)> {
        let kinds = [EventKind::Stored, EventKind::Removed, EventKind::Cleared];
        let mut out = Vec::new();
        for kind in kinds {
            for (s, label) in STATUS_LABELS.iter().enumerate() {
                let n = self.counts[kind as usize][s];
                if n > 0 {
                    out.push((kind.label(), *label, n));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
