//! Pure, synchronous core of kvrouter: what the router computes, with no I/O.
//!
//! This crate holds the hot path of a KV-cache-aware router: bit-exact block
//! hashing ([`hash`]), the event protocol that engines publish ([`protocols`]),
//! and the prefix index over every worker's cached blocks ([`index`]) in its
//! exact, approximate (TTL/prune) and concurrent (worker-sharded) forms.
//! It has no tokio, no sockets and no global state: time is passed in as an
//! [`std::time::Instant`], so everything here can be unit-tested, fuzzed and
//! benchmarked in isolation.
//!
//! The key trade-off: the index stores block *hashes*, not tokens, and learns
//! what each worker holds only from its events, so it is exactly as fresh as the
//! event stream (or, in approximate mode, as the router's own decisions).
//!
//! # Layout
//! - [`hash`]: local block hashes (XXH3-64, seed 1337) and rolling sequence hashes.
//! - [`protocols`]: `RouterEvent`, `KvCacheEvent`, `WorkerKey`, `OverlapScores`.
//! - [`index`]: `RadixIndex` (exact), `ApproxIndex` (TTL + prune), `ShardedIndex`
//!   and `ThreadedIndex` (N writer threads, concurrent lookups).
//! - [`config`]: `KvRouterConfig`, its validation, per-request overrides.
//! - [`sequences`]: active sequences per worker rank (prefill and decode load).
//! - [`selection`]: the cost function, softmax sampling, tie-breaking, router modes.
//! - [`schedule`]: the scheduling pipeline (hash → lookup → select → commit)
//!   shared by the live router and the simulator.
//! - [`queue`]: the router queue's saturation test and release order.
//! - [`recovery`]: worker-query recovery of lost KV events (the worker's log,
//!   the router's gap follower).
//! - [`sticky`]: `kv-sticky`, prefix families kept together within a load bound.
//! - [`peers`]: other routers' documented policies (sglang-router
//!   `cache_aware`, SMG `prefix_hash`, llm-d's scorers), baselines for the simulator.
//! - [`busy`]: busy thresholds and overload detection.
//! - [`llm`]: the tokenized request and engine output exchanged with workers.
//! - [`error`]: the typed error that crosses process and engine boundaries.

#![deny(missing_docs)]

pub mod busy;
pub mod config;
pub mod error;
mod fast_hash;
pub mod hash;
pub mod index;
pub mod llm;
pub mod peers;
pub mod protocols;
pub mod queue;
pub mod recovery;
pub mod schedule;
pub mod selection;
pub mod sequences;
pub mod sticky;

pub use config::{KvRouterConfig, RouterConfigOverride};
pub use hash::{ExternalSequenceBlockHash, LocalBlockHash, SequenceHash};
pub use index::{ApproxIndex, EventStats, KvCacheEventError, PruneConfig, RadixIndex};
pub use protocols::{OverlapScores, RouterEvent, WorkerKey};
pub use selection::{Decision, RouterMode, SelectionError};
