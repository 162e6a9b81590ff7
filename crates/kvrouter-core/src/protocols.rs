//! Protocol types shared by engines, the event plane and the router.
//!
//! The JSON shapes are the reference's (§4.1) so that events produced for or by
//! Dynamo deserialize unchanged: `RouterEvent {worker_id, event}`, where
//! `event = {event_id, data, dp_rank}` and `data` is externally tagged
//! (`{"stored": …}`, `{"removed": …}`, `"cleared"`). `storage_tier` is accepted
//! (default `device`) and only written when it is not `device`.

use serde::{Deserialize, Serialize};

use crate::hash::{BlockExtraInfo, ExternalSequenceBlockHash, LocalBlockHash, SequenceHash};

/// An engine instance, as registered in discovery.
pub type WorkerId = u64;
/// A data-parallel rank of an engine (0 when DP is off).
pub type DpRank = u32;

/// One data-parallel rank of one worker: the unit the index and scheduler track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerKey {
    /// The engine instance.
    pub worker_id: WorkerId,
    /// Its data-parallel rank.
    #[serde(default)]
    pub dp_rank: DpRank,
}

impl WorkerKey {
    /// A worker key.
    pub const fn new(worker_id: WorkerId, dp_rank: DpRank) -> Self {
        Self { worker_id, dp_rank }
    }
}

/// Where the cached blocks of an event live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageTier {
    /// GPU memory (the only tier the classic router indexes).
    #[default]
    Device,
    /// Pinned host memory.
    HostPinned,
    /// Local disk / NVMe.
    Disk,
    /// Remote or shared storage.
    External,
}

impl StorageTier {
    fn is_device(&self) -> bool {
        *self == StorageTier::Device
    }
}

/// A KV event from one worker, as carried by the event plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterEvent {
    /// The publishing worker.
    pub worker_id: WorkerId,
    /// Tier of the blocks; absent means device.
    #[serde(default, skip_serializing_if = "StorageTier::is_device")]
    pub storage_tier: StorageTier,
    /// The event itself.
    pub event: KvCacheEvent,
}

impl RouterEvent {
    /// An event for the device tier.
    pub fn new(worker_id: WorkerId, event: KvCacheEvent) -> Self {
        Self {
            worker_id,
            storage_tier: StorageTier::Device,
            event,
        }
    }

    /// The (worker, dp_rank) the event is about.
    pub fn worker_key(&self) -> WorkerKey {
        WorkerKey::new(self.worker_id, self.event.dp_rank)
    }
}

/// One event of a worker's rank, numbered by the publisher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheEvent {
    /// Monotonic per (worker, dp_rank).
    pub event_id: u64,
    /// What happened.
    pub data: KvCacheEventData,
    /// Data-parallel rank of the publisher.
    #[serde(default)]
    pub dp_rank: DpRank,
}

/// What happened to a worker's cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheEventData {
    /// A chain of blocks was stored under `parent_hash` (or at the root).
    Stored(KvCacheStoreData),
    /// Blocks were evicted.
    Removed(KvCacheRemoveData),
    /// Every block of the worker (all its ranks) was dropped.
    Cleared,
}

/// Payload of a stored event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheStoreData {
    /// The engine hash of the block the chain continues; `None` at the root.
    pub parent_hash: Option<ExternalSequenceBlockHash>,
    /// The chain, root-most first.
    pub blocks: Vec<KvCacheStoredBlockData>,
}

impl KvCacheStoreData {
    /// A chain stored at the root whose engine hashes are the router's own
    /// sequence hashes (`seq[i]` of `local[..=i]`): what the router writes
    /// for blocks it predicts or replays itself.
    pub fn root_chain(local: &[LocalBlockHash], seq: &[SequenceHash]) -> Self {
        Self {
            parent_hash: None,
            blocks: local
                .iter()
                .zip(seq)
                .map(|(l, s)| KvCacheStoredBlockData {
                    block_hash: ExternalSequenceBlockHash(s.0),
                    tokens_hash: *l,
                    mm_extra_info: None,
                })
                .collect(),
        }
    }
}

/// One stored block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheStoredBlockData {
    /// The engine's cumulative hash of the block.
    pub block_hash: ExternalSequenceBlockHash,
    /// The router-computed hash of the block's content.
    pub tokens_hash: LocalBlockHash,
    /// Multimodal objects in the block, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mm_extra_info: Option<BlockExtraInfo>,
}

/// Payload of a removed event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheRemoveData {
    /// Engine hashes of the evicted blocks.
    pub block_hashes: Vec<ExternalSequenceBlockHash>,
}

/// A batch of events as a worker publishes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheEvents {
    /// The events, in order.
    pub events: Vec<KvCacheEvent>,
    /// The worker is shutting down.
    #[serde(default)]
    pub shutdown: bool,
}

/// Why a byte string is not a router event.
#[derive(Debug, thiserror::Error)]
#[error("invalid router event JSON: {source}")]
pub struct DecodeError {
    #[from]
    source: serde_json::Error,
}

/// Decodes one `RouterEvent` from JSON bytes (the network edge; never panics).
pub fn decode_router_event(bytes: &[u8]) -> Result<RouterEvent, DecodeError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// Load of one worker rank, published on the `kv_metrics` subject (busy detection feed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveLoad {
    /// The worker.
    pub worker_id: WorkerId,
    /// Its rank.
    #[serde(default)]
    pub dp_rank: DpRank,
    /// Decode blocks the router predicts for the rank.
    #[serde(default)]
    pub active_decode_blocks: Option<u64>,
    /// Prefill tokens queued on the rank.
    #[serde(default)]
    pub active_prefill_tokens: Option<u64>,
    /// KV blocks in use, as the worker itself reports.
    #[serde(default)]
    pub kv_used_blocks: Option<u64>,
}

/// Per-pass engine metrics (`ForwardPassMetrics` of the reference, §4.4).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ForwardPassMetrics {
    /// Request slots and queue.
    pub worker_stats: WorkerStats,
    /// KV cache usage.
    pub kv_stats: KvStats,
}

/// Request-level engine stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Data-parallel rank, if DP is on.
    pub data_parallel_rank: Option<DpRank>,
    /// Requests running.
    pub request_active_slots: u64,
    /// Requests that can run at once.
    pub request_total_slots: u64,
    /// Requests waiting to be scheduled.
    pub num_requests_waiting: u64,
}

/// KV-cache engine stats.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KvStats {
    /// Blocks held by running requests.
    pub kv_active_blocks: u64,
    /// Blocks in the cache.
    pub kv_total_blocks: u64,
    /// `kv_active_blocks / kv_total_blocks`.
    pub gpu_cache_usage_perc: f32,
    /// Prompt tokens served from cache / prompt tokens, since start.
    pub gpu_prefix_cache_hit_rate: f32,
}

/// One worker's overlap with a looked-up prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerOverlap {
    /// The worker rank.
    pub worker: WorkerKey,
    /// Contiguous blocks of the prefix, from its start, cached on the worker.
    pub blocks: u32,
    /// Blocks the index holds for this worker in total (the tie-breaker).
    pub tree_size: usize,
}

/// The result of a prefix lookup: every worker with a non-zero overlap.
///
/// Entries are in no particular order; workers with no overlap are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlapScores {
    /// One entry per worker with overlap ≥ 1.
    pub scores: Vec<WorkerOverlap>,
}

impl OverlapScores {
    /// Overlap of `worker` in blocks (0 when absent).
    pub fn score(&self, worker: WorkerKey) -> u32 {
        self.scores
            .iter()
            .find(|s| s.worker == worker)
            .map_or(0, |s| s.blocks)
    }

    /// Tree size of `worker`, if it has an overlap.
    pub fn tree_size(&self, worker: WorkerKey) -> Option<usize> {
        self.scores
            .iter()
            .find(|s| s.worker == worker)
            .map(|s| s.tree_size)
    }

    /// `(worker, overlap)` pairs sorted by worker: a canonical form for comparisons.
    pub fn sorted(&self) -> Vec<(WorkerKey, u32)> {
        let mut v: Vec<_> = self.scores.iter().map(|s| (s.worker, s.blocks)).collect();
        v.sort_unstable();
        v
    }

    /// Whether no worker overlaps.
    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn roundtrip(literal: &str) -> RouterEvent {
        let ev: RouterEvent = serde_json::from_str(literal).expect("parses");
        let back: Value = serde_json::to_value(&ev).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(literal).unwrap());
        ev
    }

    #[test]
    fn stored_json_matches_reference() {
        let ev = roundtrip(
            r#"{"worker_id":7,"event":{"event_id":3,"data":{"stored":{"parent_hash":11,
            "blocks":[{"block_hash":12,"tokens_hash":99},{"block_hash":13,"tokens_hash":98,
            "mm_extra_info":{"mm_objects":[{"mm_hash":5,"offsets":[[0,4]]}]}}]}},"dp_rank":1}}"#,
        );
        assert_eq!(ev.worker_key(), WorkerKey::new(7, 1));
        let KvCacheEventData::Stored(s) = &ev.event.data else {
            panic!("not stored")
        };
        assert_eq!(s.parent_hash, Some(ExternalSequenceBlockHash(11)));
        assert_eq!(s.blocks[1].tokens_hash, LocalBlockHash(98));
    }

    #[test]
    fn root_stored_removed_and_cleared_json() {
        roundtrip(
            r#"{"worker_id":1,"event":{"event_id":0,"data":{"stored":{"parent_hash":null,"blocks":[]}},"dp_rank":0}}"#,
        );
        roundtrip(
            r#"{"worker_id":1,"event":{"event_id":1,"data":{"removed":{"block_hashes":[1,2,18446744073709551615]}},"dp_rank":0}}"#,
        );
        let ev =
            roundtrip(r#"{"worker_id":2,"event":{"event_id":9,"data":"cleared","dp_rank":3}}"#);
        assert_eq!(ev.event.data, KvCacheEventData::Cleared);
    }

    #[test]
    fn defaults_and_tiers() {
        let ev: RouterEvent =
            serde_json::from_value(json!({"worker_id":1,"event":{"event_id":0,"data":"cleared"}}))
                .unwrap();
        assert_eq!(ev.event.dp_rank, 0);
        assert_eq!(ev.storage_tier, StorageTier::Device);
        let host = roundtrip(
            r#"{"worker_id":1,"storage_tier":"host_pinned","event":{"event_id":0,"data":"cleared","dp_rank":0}}"#,
        );
        assert_eq!(host.storage_tier, StorageTier::HostPinned);
    }

    #[test]
    fn malformed_json_is_an_error() {
        for bad in [
            &b""[..],
            b"{}",
            b"{\"worker_id\":-1,\"event\":{\"event_id\":0,\"data\":\"cleared\"}}",
            b"{\"worker_id\":1,\"event\":{\"event_id\":0,\"data\":\"exploded\"}}",
            b"\xff\xfe",
        ] {
            assert!(decode_router_event(bad).is_err());
        }
    }

    #[test]
    fn batch_json() {
        let b: KvCacheEvents = serde_json::from_str(
            r#"{"events":[{"event_id":0,"data":"cleared","dp_rank":0}],"shutdown":false}"#,
        )
        .unwrap();
        assert_eq!(b.events.len(), 1);
    }
}
