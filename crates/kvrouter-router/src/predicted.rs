//! Predicted caches of engines that publish no KV events, in a router that
//! follows the events of the others: each routing decision to such an
//! engine is written into the index as if the engine had stored the prompt's
//! blocks, and forgotten `--router-ttl` after the last request that used
//! them (approximate mode, per engine).
//!
//! Engine hashes are the router's own sequence hashes, so a prefix shared by
//! several requests is one chain. A block's expiry is pushed back by every
//! request that uses it; parents are used by every request that uses their
//! children, so they never expire first.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvrouter_core::hash::{LocalBlockHash, sequence_hashes};
use kvrouter_core::protocols::{
    KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
};
use kvrouter_core::{ExternalSequenceBlockHash, RouterEvent, WorkerKey};
use parking_lot::Mutex;

use crate::router::KvRouter;

/// The predicted blocks of event-less engines (see the module docs).
pub struct Predicted {
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Last use of each predicted block.
    last: HashMap<(WorkerKey, u64), Instant>,
    /// Uses in time order; stale entries are skipped when they expire.
    queue: VecDeque<(Instant, WorkerKey, u64)>,
}

impl Predicted {
    /// Blocks kept `ttl` after their last use.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            state: Mutex::new(State::default()),
        }
    }

    /// Records that a request with blocks `local` was sent to `worker`.
    pub fn routed(
        &self,
        router: &KvRouter,
        worker: WorkerKey,
        local: &[LocalBlockHash],
        now: Instant,
    ) {
        if local.is_empty() {
            return;
        }
        let seq = sequence_hashes(local);
        {
            let mut st = self.state.lock();
            for s in &seq {
                st.last.insert((worker, s.0), now);
                st.queue.push_back((now, worker, s.0));
            }
        }
        router.apply_event(&RouterEvent::new(
            worker.worker_id,
            KvCacheEvent {
                event_id: 0,
                data: KvCacheEventData::Stored(KvCacheStoreData::root_chain(local, &seq)),
                dp_rank: worker.dp_rank,
            },
        ));
    }

    /// Forgets the blocks unused for the TTL; returns how many.
    pub fn expire(&self, router: &KvRouter, now: Instant) -> usize {
        let mut gone: HashMap<WorkerKey, Vec<ExternalSequenceBlockHash>> = HashMap::new();
        {
            let mut st = self.state.lock();
            while let Some(&(at, w, h)) = st.queue.front() {
                if at + self.ttl > now {
                    break;
                }
                st.queue.pop_front();
                // Only the block's latest use decides.
                if st.last.get(&(w, h)) == Some(&at) {
                    st.last.remove(&(w, h));
                    gone.entry(w)
                        .or_default()
                        .push(ExternalSequenceBlockHash(h));
                }
            }
        }
        let mut n = 0;
        for (w, mut hashes) in gone {
            n += hashes.len();
            // Children before parents: the chain's deepest blocks were pushed last.
            hashes.reverse();
            router.apply_event(&RouterEvent::new(
                w.worker_id,
                KvCacheEvent {
                    event_id: 0,
                    data: KvCacheEventData::Removed(KvCacheRemoveData {
                        block_hashes: hashes,
                    }),
                    dp_rank: w.dp_rank,
                },
            ));
        }
        n
    }

    /// Expires blocks once a second until `cancel`.
    pub fn spawn_expiry(
        self: &Arc<Self>,
        router: Arc<KvRouter>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => { me.expire(&router, Instant::now()); }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter_core::busy::LoadThresholds;
    use kvrouter_core::hash::block_hashes;
    use kvrouter_core::{KvRouterConfig, RouterMode};
    use kvrouter_runtime::endpoint::WorkerMetadata;

    #[test]
    fn predictions_enter_the_index_and_expire_after_their_last_use() {
        let router = KvRouter::new(
            RouterMode::Kv,
            KvRouterConfig::default(),
            4,
            LoadThresholds::default(),
            crate::RouterMetrics::unregistered(),
        );
        let w = WorkerKey::new(5, 0);
        router.add_worker(
            5,
            &WorkerMetadata {
                model_name: "m".into(),
                block_size: 4,
                total_kv_blocks: 100,
                max_num_seqs: 8,
                max_num_batched_tokens: 100,
                data_parallel_size: 1,
                enable_local_indexer: false,
            },
        );
        let p = Predicted::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let long: Vec<u32> = (0..12).collect();
        p.routed(&router, w, &block_hashes(&long, 4), t0);
        // A later request reuses the first two blocks only.
        p.routed(
            &router,
            w,
            &block_hashes(&long[..8], 4),
            t0 + Duration::from_secs(5),
        );
        assert_eq!(router.find_matches(&long).score(w), 3);
        assert_eq!(p.expire(&router, t0 + Duration::from_secs(11)), 1);
        assert_eq!(
            router.find_matches(&long).score(w),
            2,
            "the unshared tail expired"
        );
        assert_eq!(p.expire(&router, t0 + Duration::from_secs(16)), 2);
        assert_eq!(router.find_matches(&long).score(w), 0);
    }
}
