//! Replays a kv-ops/1 file through `dynamo-kv-router` 1.6.1 — its single-threaded
//! `RadixTree`, or its `ConcurrentRadixTreeCompressed` behind a `ThreadPoolIndexer`
//! — with the same loader, timing and JSON report as `kvrouter bench index`.
//!
//! Both adapters build one owned `RouterEvent` per op, as events arrive from the
//! wire, and one `Vec<LocalBlockHash>` per query, as `find_matches` takes it.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use dynamo_kv_router::concurrent_radix_tree_compressed::ConcurrentRadixTreeCompressed;
use dynamo_kv_router::indexer::{SyncIndexer, ThreadPoolIndexer};
use dynamo_kv_router::protocols::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData,
    KvCacheStoreData, KvCacheStoredBlockData, LocalBlockHash, RouterEvent,
};
use dynamo_kv_router::RadixTree;
use kvrouter_kvops::{ReplayTarget, Workload, replay};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Backend {
    Single,
    Concurrent,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    ops: PathBuf,
    #[arg(long, value_enum, default_value_t = Backend::Single)]
    backend: Backend,
    #[arg(long, default_value_t = 4)]
    threads: usize,
    #[arg(long)]
    no_progress: bool,
}

fn stored(worker: u64, id: u64, parent: Option<u64>, blocks: &[u64]) -> RouterEvent {
    let blocks = blocks
        .iter()
        .map(|&h| KvCacheStoredBlockData {
            block_hash: ExternalSequenceBlockHash(h),
            tokens_hash: LocalBlockHash(h),
            mm_extra_info: None,
        })
        .collect();
    event(
        worker,
        id,
        KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: parent.map(ExternalSequenceBlockHash),
            start_position: None,
            blocks,
        }),
    )
}

fn removed(worker: u64, id: u64, blocks: &[u64]) -> RouterEvent {
    let block_hashes = blocks.iter().copied().map(ExternalSequenceBlockHash).collect();
    event(worker, id, KvCacheEventData::Removed(KvCacheRemoveData { block_hashes }))
}

fn event(worker: u64, event_id: u64, data: KvCacheEventData) -> RouterEvent {
    RouterEvent::new(worker, KvCacheEvent { event_id, data, dp_rank: 0 })
}

fn locals(blocks: &[u64]) -> Vec<LocalBlockHash> {
    blocks.iter().copied().map(LocalBlockHash).collect()
}

struct Single {
    tree: RadixTree,
    next_id: u64,
}

impl Single {
    fn apply(&mut self, ev: RouterEvent) -> bool {
        self.next_id += 1;
        self.tree.apply_event(ev).is_ok()
    }
}

impl ReplayTarget for Single {
    fn store(&mut self, worker: u64, parent: Option<u64>, blocks: &[u64]) -> bool {
        let ev = stored(worker, self.next_id, parent, blocks);
        self.apply(ev)
    }
    fn remove(&mut self, worker: u64, blocks: &[u64]) -> bool {
        let ev = removed(worker, self.next_id, blocks);
        self.apply(ev)
    }
    fn clear(&mut self, worker: u64) -> bool {
        let ev = event(worker, self.next_id, KvCacheEventData::Cleared);
        self.apply(ev)
    }
    fn query(&mut self, blocks: &[u64], out: &mut Vec<(u64, u32)>) {
        let m = self.tree.find_matches(locals(blocks), false);
        out.extend(m.scores.iter().map(|(w, s)| (w.worker_id, *s)));
    }
}

struct Concurrent {
    pool: ThreadPoolIndexer<ConcurrentRadixTreeCompressed>,
    rt: tokio::runtime::Runtime,
    next_id: u64,
}

impl Concurrent {
    fn submit(&mut self, ev: RouterEvent) -> bool {
        self.next_id += 1;
        self.pool.enqueue_event(ev).is_ok()
    }
}

impl ReplayTarget for Concurrent {
    fn store(&mut self, worker: u64, parent: Option<u64>, blocks: &[u64]) -> bool {
        let ev = stored(worker, self.next_id, parent, blocks);
        self.submit(ev)
    }
    fn remove(&mut self, worker: u64, blocks: &[u64]) -> bool {
        let ev = removed(worker, self.next_id, blocks);
        self.submit(ev)
    }
    fn clear(&mut self, worker: u64) -> bool {
        let ev = event(worker, self.next_id, KvCacheEventData::Cleared);
        self.submit(ev)
    }
    fn query(&mut self, blocks: &[u64], out: &mut Vec<(u64, u32)>) {
        // The expected answer holds after every earlier op: wait for the writers.
        self.rt.block_on(self.pool.flush_and_wait()).expect("flush");
        let m = self.pool.backend().find_matches(&locals(blocks), false);
        out.extend(m.scores.iter().map(|(w, s)| (w.worker_id, *s)));
    }
    fn finish(&mut self) -> u64 {
        self.rt.block_on(self.pool.flush_and_wait()).expect("flush");
        0
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let workload = Workload::load(&args.ops)?;
    let progress = !args.no_progress;
    let report = match args.backend {
        Backend::Single => {
            let mut t = Single { tree: RadixTree::new(), next_id: 0 };
            replay(&workload, &mut t, "dynamo-kv-router", "single", progress)
        }
        Backend::Concurrent => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let pool = {
                let _guard = rt.enter();
                ThreadPoolIndexer::new(ConcurrentRadixTreeCompressed::new(), args.threads, 1)
            };
            let mut t = Concurrent { pool, rt, next_id: 0 };
            replay(&workload, &mut t, "dynamo-kv-router", "concurrent", progress)
        }
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
