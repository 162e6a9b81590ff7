//! Criterion micro-benchmarks of the index's hot operations:
//! `find_matches` on trees of 10^3, 10^5 and 10^6 blocks held by 16 and 256
//! workers, applying a 32-block `stored` event, and a 32-block `removed` event.
//!
//! Run: `cargo bench -p kvrouter-core --bench index`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use kvrouter_core::protocols::{
    KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData,
    RouterEvent,
};
use kvrouter_core::{ExternalSequenceBlockHash, LocalBlockHash, RadixIndex};

const CHAIN: u64 = 32;
const SHARED_PREFIX: u64 = 4;

fn stored(
    worker: u64,
    parent: Option<u64>,
    blocks: impl Iterator<Item = (u64, u64)>,
) -> RouterEvent {
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: 0,
            dp_rank: 0,
            data: KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent.map(ExternalSequenceBlockHash),
                blocks: blocks
                    .map(|(e, l)| KvCacheStoredBlockData {
                        block_hash: ExternalSequenceBlockHash(e),
                        tokens_hash: LocalBlockHash(l),
                        mm_extra_info: None,
                    })
                    .collect(),
            }),
        },
    )
}

/// `blocks` blocks over `workers` workers: every worker holds a 4-block shared
/// prefix and then 32-block conversations under it.
fn tree(blocks: u64, workers: u64) -> RadixIndex {
    let mut ix = RadixIndex::new();
    let per_worker = (blocks / workers).max(CHAIN + SHARED_PREFIX);
    for w in 0..workers {
        ix.apply_event(&stored(w, None, (0..SHARED_PREFIX).map(|i| (i + 1, i + 1))))
            .expect("prefix");
        let chains = (per_worker - SHARED_PREFIX) / CHAIN;
        for c in 0..chains {
            let base = (w << 40) | (c << 8);
            ix.apply_event(&stored(
                w,
                Some(SHARED_PREFIX),
                (0..CHAIN).map(|i| (base + i + 1_000, base + i + 1_000)),
            ))
            .expect("chain");
        }
    }
    ix
}

fn find_matches(c: &mut Criterion) {
    let mut g = c.benchmark_group("find_matches");
    for blocks in [1_000u64, 100_000, 1_000_000] {
        for workers in [16u64, 256] {
            let ix = tree(blocks, workers);
            // A prompt that continues worker 3's first conversation.
            let base = 3u64 << 40;
            let query: Vec<LocalBlockHash> = (1..=SHARED_PREFIX)
                .chain((0..CHAIN).map(|i| base + i + 1_000))
                .chain([42, 43])
                .map(LocalBlockHash)
                .collect();
            assert!(
                ix.find_matches(&query)
                    .score(kvrouter_core::WorkerKey::new(3, 0))
                    > 4
            );
            let id = format!(
                "{blocks}blocks/{workers}workers",
                blocks = ix.current_size()
            );
            g.bench_function(BenchmarkId::from_parameter(id), |b| {
                b.iter(|| black_box(ix.find_matches(black_box(&query))))
            });
        }
    }
    g.finish();
}

fn events(c: &mut Criterion) {
    let mut ix = tree(100_000, 16);
    let chain: Vec<u64> = (0..CHAIN).map(|i| (99u64 << 40) + i).collect();
    let store = stored(7, Some(SHARED_PREFIX), chain.iter().map(|&h| (h, h)));
    let remove = RouterEvent::new(
        7,
        KvCacheEvent {
            event_id: 0,
            dp_rank: 0,
            data: KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: chain
                    .iter()
                    .rev()
                    .copied()
                    .map(ExternalSequenceBlockHash)
                    .collect(),
            }),
        },
    );
    let mut g = c.benchmark_group("apply_event");
    g.bench_function("stored_32_blocks", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                ix.apply_event(black_box(&store)).expect("store");
                spent += t.elapsed();
                ix.apply_event(&remove).expect("remove");
            }
            spent
        })
    });
    g.bench_function("removed_32_blocks", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                ix.apply_event(&store).expect("store");
                let t = Instant::now();
                ix.apply_event(black_box(&remove)).expect("remove");
                spent += t.elapsed();
            }
            spent
        })
    });
    g.finish();
}

criterion_group!(benches, find_matches, events);
criterion_main!(benches);
