//! `kvrouter bench …`: replay recorded workloads against kvrouter's components.
//!
//! `bench index` loads a kv-ops/1 file into memory, replays it through the
//! exact index (single-threaded, or sharded over N writer threads) and prints
//! one JSON line (see `kvrouter_kvops::Report`). The same harness drives
//! Dynamo's index in `bench/dynamo-compare`, so the two lines compare directly.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use kvrouter_core::index::{RadixIndex, ThreadedIndex};
use kvrouter_core::protocols::{
    KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData,
    RouterEvent,
};
use kvrouter_core::{ExternalSequenceBlockHash, LocalBlockHash};
use kvrouter_kvops::{ReplayTarget, Workload, replay};

/// `kvrouter bench` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Replay a kv-ops/1 file (from shared/tools/kv-ops-gen) against the KV index.
    Index(IndexArgs),
    /// Replay a Mooncake trace as open-loop HTTP load against an OpenAI endpoint.
    Http(crate::loadgen::HttpArgs),
    /// `best_worker_id` round trips over TCP against an indexed trace, and snapshot recovery.
    Router(crate::bench_router::RouterBenchArgs),
    /// Open-loop streaming chat with shared system prompts against an OpenAI endpoint.
    Chat(crate::bench_chat::ChatArgs),
    /// KV-event latency: engine ZeroMQ straight to a router vs through a sidecar and NATS.
    KvHop(crate::bench_hop::HopArgs),
}

/// Which index implementation to replay against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// One `RadixIndex` on the calling thread.
    Single,
    /// A worker-sharded index written by `--threads` threads.
    Concurrent,
}

/// `kvrouter bench index` flags.
#[derive(Debug, Clone, Args)]
pub struct IndexArgs {
    /// The kv-ops/1 workload file.
    #[arg(long, value_name = "FILE")]
    pub ops: PathBuf,
    /// Index implementation.
    #[arg(long, value_enum, default_value_t = Backend::Single)]
    pub backend: Backend,
    /// Writer threads of the concurrent backend.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
    /// Hide the progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

/// Runs a bench subcommand.
pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Index(args) => bench_index(args),
        BenchCommand::Http(args) => crate::loadgen::run(args),
        BenchCommand::Router(args) => crate::bench_router::run(args),
        BenchCommand::Chat(args) => crate::bench_chat::run(args),
        BenchCommand::KvHop(args) => crate::bench_hop::run(args),
    }
}

fn bench_index(args: IndexArgs) -> anyhow::Result<ExitCode> {
    let workload = Workload::load(&args.ops).context("loading the workload")?;
    let progress = !args.no_progress;
    let report = match args.backend {
        Backend::Single => replay(
            &workload,
            &mut Single::default(),
            "kvrouter",
            "single",
            progress,
        ),
        Backend::Concurrent => replay(
            &workload,
            &mut Concurrent::new(args.threads as usize),
            "kvrouter",
            "concurrent",
            progress,
        ),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// kv-ops hashes identify whole prefixes, so each is both the engine hash and the edge key.
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
            blocks,
        }),
    )
}

fn removed(worker: u64, id: u64, blocks: &[u64]) -> RouterEvent {
    let block_hashes = blocks
        .iter()
        .copied()
        .map(ExternalSequenceBlockHash)
        .collect();
    event(
        worker,
        id,
        KvCacheEventData::Removed(KvCacheRemoveData { block_hashes }),
    )
}

fn event(worker: u64, event_id: u64, data: KvCacheEventData) -> RouterEvent {
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id,
            data,
            dp_rank: 0,
        },
    )
}

fn locals(blocks: &[u64]) -> Vec<LocalBlockHash> {
    blocks.iter().copied().map(LocalBlockHash).collect()
}

#[derive(Default)]
struct Single {
    index: RadixIndex,
    next_id: u64,
}

impl Single {
    fn apply(&mut self, ev: RouterEvent) -> bool {
        self.next_id += 1;
        self.index.apply_event(&ev).is_ok()
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
        let m = self.index.find_matches(&locals(blocks));
        out.extend(m.scores.iter().map(|s| (s.worker.worker_id, s.blocks)));
    }
}

struct Concurrent {
    index: ThreadedIndex,
    next_id: u64,
}

impl Concurrent {
    fn new(threads: usize) -> Self {
        Self {
            index: ThreadedIndex::new(threads),
            next_id: 0,
        }
    }

    fn submit(&mut self, ev: RouterEvent) -> bool {
        self.next_id += 1;
        self.index.submit(ev);
        true // outcomes are counted by the shards and reported by `finish`
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
        self.index.flush();
        let m = self.index.index().find_matches(&locals(blocks));
        out.extend(m.scores.iter().map(|s| (s.worker.worker_id, s.blocks)));
    }

    fn finish(&mut self) -> u64 {
        self.index.flush();
        self.index.index().stats().errors()
    }
}
