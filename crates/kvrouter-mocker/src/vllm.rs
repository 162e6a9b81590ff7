//! The mock worker as a stand-in vLLM: what it takes to look like one from
//! outside — KV events in vLLM's ZeroMQ format with a replay buffer, and the
//! load vLLM reports under its own metric names.
//!
//! vLLM's events carry each block's token ids, which the engine's own events
//! do not: the worker keeps a [`TokenBook`] of the prompt blocks of its
//! in-flight requests (by content hash, refcounted by request) and looks the
//! tokens up when the blocks are stored. Blocks the engine generated while
//! decoding hold no prompt tokens; they are published with token ids derived
//! from their hash, all ≥ 2³⁰ (outside every vocabulary), so a router keys
//! each uniquely and no prompt ever matches one — as Dynamo's mocker's random
//! output tokens never do.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvrouter_core::protocols::{KvCacheEvent, KvCacheEventData};
use kvrouter_engines::publisher::{EventFormat, ZmqKvPublisher};
use kvrouter_engines::wire::{BlockRemoved, BlockStored, EngineEvent};
use parking_lot::Mutex;

/// Where a stand-in worker publishes its KV events (rank r: port + r).
#[derive(Debug, Clone)]
pub struct ZmqEventsConfig {
    /// Host the sockets bind (`*` for every interface, as vLLM's default).
    pub host: String,
    /// Rank 0's PUB port.
    pub port: u16,
    /// Rank 0's replay ROUTER port, if replay is on.
    pub replay_port: Option<u16>,
    /// Map (vLLM ≥ 0.24) or array (older) events.
    pub format: EventFormat,
}

impl ZmqEventsConfig {
    fn endpoint(&self, port: u16, rank: u32) -> String {
        // Port 0 lets the OS choose, for every rank (as vLLM ≥ 0.31 allows).
        let port = if port == 0 { 0 } else { u32::from(port) + rank };
        format!("tcp://{}:{port}", self.host)
    }

    /// Binds rank `rank`'s publisher.
    pub async fn bind(&self, rank: u32) -> Result<ZmqKvPublisher, zeromq::ZmqError> {
        let replay = self.replay_port.map(|p| self.endpoint(p, rank));
        ZmqKvPublisher::bind(
            &self.endpoint(self.port, rank),
            replay.as_deref(),
            rank,
            self.format,
        )
        .await
    }
}

/// `/kv_event_sources` as vLLM ≥ 0.31 serves it, `{rank: KVEventsConfig}`,
/// from the addresses each rank's sockets were bound to.
pub fn sources_json(bound: &[(String, Option<String>)]) -> serde_json::Value {
    let m: serde_json::Map<String, serde_json::Value> = bound
        .iter()
        .enumerate()
        .map(|(r, (endpoint, replay))| {
            (
                r.to_string(),
                serde_json::json!({
                    "enable_kv_cache_events": true, "publisher": "zmq",
                    "endpoint": endpoint, "replay_endpoint": replay,
                    "buffer_steps": kvrouter_engines::publisher::BUFFER_STEPS, "topic": "",
                }),
            )
        })
        .collect();
    serde_json::Value::Object(m)
}

/// A block's tokens and the number of in-flight requests holding them.
type Entry = (Arc<[u32]>, u32);

/// Prompt tokens of the blocks in-flight requests may store, by content hash.
#[derive(Debug, Default)]
pub struct TokenBook {
    blocks: Mutex<HashMap<u64, Entry>>,
}

/// Keeps a request's prompt blocks in the book until it ends.
pub struct BookGuard {
    book: Arc<TokenBook>,
    keys: Vec<u64>,
}

impl TokenBook {
    /// Records the blocks `(content hash, tokens)` of one request.
    pub fn acquire(self: &Arc<Self>, blocks: Vec<(u64, &[u32])>) -> BookGuard {
        let mut m = self.blocks.lock();
        let keys = blocks
            .into_iter()
            .map(|(k, t)| {
                m.entry(k).or_insert_with(|| (Arc::from(t), 0)).1 += 1;
                k
            })
            .collect();
        BookGuard {
            book: self.clone(),
            keys,
        }
    }

    fn tokens(&self, key: u64) -> Option<Arc<[u32]>> {
        self.blocks.lock().get(&key).map(|(t, _)| t.clone())
    }

    /// Blocks recorded (tests).
    pub fn len(&self) -> usize {
        self.blocks.lock().len()
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for BookGuard {
    fn drop(&mut self) {
        let mut m = self.book.blocks.lock();
        for k in &self.keys {
            if let Some(e) = m.get_mut(k) {
                e.1 -= 1;
                if e.1 == 0 {
                    m.remove(k);
                }
            }
        }
    }
}

/// Token ids standing for a generated block (see the module docs).
fn generated_tokens(key: u64, block_size: usize) -> Vec<u32> {
    let mut x = key;
    (0..block_size)
        .map(|_| {
            // splitmix64: cheap, well mixed, deterministic.
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) as u32) | (1 << 30)
        })
        .collect()
}

/// The engine's events of one pass, as vLLM would publish them.
pub fn engine_events(
    events: &[KvCacheEvent],
    book: &TokenBook,
    block_size: usize,
) -> Vec<EngineEvent> {
    events
        .iter()
        .map(|ev| match &ev.data {
            KvCacheEventData::Stored(s) => {
                let mut token_ids = Vec::with_capacity(s.blocks.len() * block_size);
                for b in &s.blocks {
                    match book.tokens(b.tokens_hash.0) {
                        Some(t) => token_ids.extend_from_slice(&t),
                        None => token_ids.extend(generated_tokens(b.tokens_hash.0, block_size)),
                    }
                }
                EngineEvent::Stored(BlockStored {
                    block_hashes: s.blocks.iter().map(|b| b.block_hash.0).collect(),
                    parent_block_hash: s.parent_hash.map(|p| p.0),
                    token_ids,
                    block_size: block_size as u32,
                    medium: Some("GPU".into()),
                    group_idx: Some(0),
                    ..Default::default()
                })
            }
            KvCacheEventData::Removed(r) => EngineEvent::Removed(BlockRemoved {
                block_hashes: r.block_hashes.iter().map(|h| h.0).collect(),
                medium: Some("GPU".into()),
                group_idx: Some(0),
            }),
            KvCacheEventData::Cleared => EngineEvent::AllCleared,
        })
        .collect()
}

/// One rank's load, kept current by its engine loop, read by `/metrics`.
#[derive(Debug, Default)]
pub struct RankStats {
    /// Requests running.
    pub running: AtomicU64,
    /// Requests waiting.
    pub waiting: AtomicU64,
    /// KV blocks in use.
    pub kv_used_blocks: AtomicU64,
    /// KV blocks in all.
    pub kv_total_blocks: AtomicU64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: AtomicU64,
    /// Of those, tokens found cached.
    pub prefix_hits: AtomicU64,
    /// KV events and load reports the event plane refused.
    pub publish_errors: AtomicU64,
}

/// The ranks' load in vLLM's metric names (labels `engine`, `model_name`).
pub fn prometheus_text(model: &str, block_size: usize, ranks: &[Arc<RankStats>]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    type Read = fn(&RankStats) -> f64;
    let families: [(&str, &str, Read); 6] = [
        ("vllm:num_requests_running", "gauge", |s| {
            s.running.load(Ordering::Relaxed) as f64
        }),
        ("vllm:num_requests_waiting", "gauge", |s| {
            s.waiting.load(Ordering::Relaxed) as f64
        }),
        ("vllm:kv_cache_usage_perc", "gauge", |s| {
            s.kv_used_blocks.load(Ordering::Relaxed) as f64
                / s.kv_total_blocks.load(Ordering::Relaxed).max(1) as f64
        }),
        ("vllm:prefix_cache_queries_total", "counter", |s| {
            s.prefix_queries.load(Ordering::Relaxed) as f64
        }),
        ("vllm:prefix_cache_hits_total", "counter", |s| {
            s.prefix_hits.load(Ordering::Relaxed) as f64
        }),
        ("kvrouter_mocker_publish_errors_total", "counter", |s| {
            s.publish_errors.load(Ordering::Relaxed) as f64
        }),
    ];
    for (name, kind, f) in families {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (r, s) in ranks.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{engine=\"{r}\",model_name=\"{model}\"}} {}",
                f(s)
            );
        }
    }
    let _ = writeln!(out, "# TYPE vllm:cache_config_info gauge");
    let blocks = ranks
        .first()
        .map_or(0, |s| s.kv_total_blocks.load(Ordering::Relaxed));
    let _ = writeln!(
        out,
        "vllm:cache_config_info{{block_size=\"{block_size}\",enable_prefix_caching=\"True\",num_gpu_blocks=\"{blocks}\"}} 1"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter_core::protocols::{KvCacheStoreData, KvCacheStoredBlockData};
    use kvrouter_core::{ExternalSequenceBlockHash, LocalBlockHash};

    #[test]
    fn stored_blocks_carry_their_prompt_tokens() {
        let book = Arc::new(TokenBook::default());
        let guard = book.acquire(vec![(11, &[1, 2][..])]);
        let ev = KvCacheEvent {
            event_id: 0,
            dp_rank: 0,
            data: KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: None,
                blocks: vec![
                    KvCacheStoredBlockData {
                        block_hash: ExternalSequenceBlockHash(100),
                        tokens_hash: LocalBlockHash(11),
                        mm_extra_info: None,
                    },
                    KvCacheStoredBlockData {
                        block_hash: ExternalSequenceBlockHash(101),
                        tokens_hash: LocalBlockHash(12),
                        mm_extra_info: None,
                    },
                ],
            }),
        };
        let out = engine_events(std::slice::from_ref(&ev), &book, 2);
        let EngineEvent::Stored(s) = &out[0] else {
            panic!()
        };
        assert_eq!(s.block_hashes, vec![100, 101]);
        assert_eq!(&s.token_ids[..2], &[1, 2]);
        assert!(
            s.token_ids[2..].iter().all(|t| *t >= 1 << 30),
            "generated block"
        );
        drop(guard);
        assert!(book.is_empty());
    }

    #[test]
    fn metrics_use_vllm_names() {
        let s = Arc::new(RankStats::default());
        s.running.store(2, Ordering::Relaxed);
        s.kv_used_blocks.store(25, Ordering::Relaxed);
        s.kv_total_blocks.store(100, Ordering::Relaxed);
        s.publish_errors.store(3, Ordering::Relaxed);
        let text = prometheus_text("m", 16, &[s]);
        assert!(
            text.contains("kvrouter_mocker_publish_errors_total{engine=\"0\",model_name=\"m\"} 3")
        );
        assert!(text.contains("vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 2"));
        assert!(text.contains("vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25"));
        assert!(text.contains("block_size=\"16\""));
    }
}
