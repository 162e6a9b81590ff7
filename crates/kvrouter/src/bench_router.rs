//! `kvrouter bench router`: the standalone router's query path and its
//! recovery, measured.
//!
//! - Round trips: 64 workers registered in (in-memory) discovery, the index
//!   filled from the Mooncake trace's prompts (each prompt stored on one
//!   worker, round-robin), a `StandaloneRouter` on the TCP request plane, and
//!   `--concurrency` callers sending `best_worker_id` for the same prompts
//!   over real loopback sockets. Reports calls/s and latency percentiles.
//! - Recovery (`--recovery-blocks N`, needs `nats-server` on PATH): an index
//!   of N blocks is snapshotted to a JetStream object store on a throw-away
//!   `nats-server -js`, then a new router is started from it; reports the time
//!   to download, decode and apply the snapshot, and checks the block count.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use kvrouter_core::busy::LoadThresholds;
use kvrouter_core::hash::{block_hashes, sequence_hashes};
use kvrouter_core::protocols::{
    KvCacheEvent, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData, RouterEvent,
};
use kvrouter_core::{ExternalSequenceBlockHash, KvRouterConfig, RouterMode};
use kvrouter_router::standalone::{StandaloneRouter, router_endpoint};
use kvrouter_router::{KvRouter, RouterMetrics, WorkerPool};
use kvrouter_runtime::endpoint::{EndpointId, Instance, WorkerMetadata};
use kvrouter_runtime::node::{LEASE_TTL, Node};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// `kvrouter bench router` flags.
#[derive(Debug, Clone, Args)]
pub struct RouterBenchArgs {
    /// Mooncake-style JSONL trace whose prompts fill the index and are queried.
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,
    /// Workers registered.
    #[arg(long, default_value_t = 64)]
    pub workers: u32,
    /// Trace requests used.
    #[arg(long, default_value_t = 4000)]
    pub limit: usize,
    /// Concurrent callers.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Calls in total.
    #[arg(long, default_value_t = 40_000)]
    pub calls: usize,
    /// KV block size of the router.
    #[arg(long, default_value_t = 64)]
    pub block_size: u32,
    /// Also measure recovery from a snapshot of this many blocks (0: skip).
    #[arg(long, default_value_t = 0)]
    pub recovery_blocks: usize,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

fn stored(worker_id: u64, event_id: u64, tokens: &[u32], block_size: usize) -> RouterEvent {
    let local = block_hashes(tokens, block_size);
    let seq = sequence_hashes(&local);
    RouterEvent::new(
        worker_id,
        KvCacheEvent {
            event_id,
            data: KvCacheEventData::Stored(KvCacheStoreData::root_chain(&local, &seq)),
            dp_rank: 0,
        },
    )
}

fn meta(block_size: u32) -> serde_json::Value {
    serde_json::to_value(WorkerMetadata {
        model_name: "bench".into(),
        block_size,
        total_kv_blocks: 1 << 20,
        max_num_seqs: 256,
        max_num_batched_tokens: 8192,
        data_parallel_size: 1,
        enable_local_indexer: false,
    })
    .expect("metadata serializes")
}

fn router(block_size: u32, cfg: KvRouterConfig) -> Arc<KvRouter> {
    KvRouter::new(
        RouterMode::Kv,
        cfg,
        block_size,
        LoadThresholds::default(),
        RouterMetrics::unregistered(),
    )
}

/// Runs the benchmark and prints one JSON line.
pub fn run(args: RouterBenchArgs) -> anyhow::Result<ExitCode> {
    let trace = kvrouter_mocker::trace::load(&args.trace, Some(args.limit))
        .with_context(|| format!("reading {}", args.trace.display()))?;
    anyhow::ensure!(!trace.is_empty(), "the trace is empty");
    let prompts: Vec<Vec<u32>> = trace
        .iter()
        .map(|r| {
            let mut t = Vec::new();
            for (k, id) in r.hash_ids.iter().enumerate() {
                let n = 512usize.min(r.input_length.saturating_sub(k * 512));
                crate::loadgen::tokens_of_block(*id, &mut t, n);
            }
            t.truncate(8192);
            t
        })
        .filter(|t| !t.is_empty())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let node = Node::in_process();
        let workers: EndpointId = "bench.backend.generate"
            .parse()
            .map_err(anyhow::Error::msg)?;
        // Workers exist only in discovery: best_worker_id never calls them.
        let mut registrations = Vec::new();
        for w in 1..=u64::from(args.workers) {
            let i = Instance {
                id: w,
                endpoint: workers.clone(),
                address: "tcp://127.0.0.1:9".into(),
                metadata: meta(args.block_size),
            };
            registrations.push(node.discovery.register(i, LEASE_TTL).await?);
        }
        let r = router(args.block_size, KvRouterConfig::default());
        let cancel = CancellationToken::new();
        let pool = WorkerPool::start(node.clone(), workers, r.clone(), cancel.clone())
            .await
            .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            pool.wait_for_workers(args.workers as usize, Duration::from_secs(5))
                .await,
            "workers not discovered"
        );
        for (i, p) in prompts.iter().enumerate() {
            let w = 1 + (i as u64 % u64::from(args.workers));
            r.apply_event(&stored(w, i as u64, p, args.block_size as usize));
        }
        let indexed = r.index_size();
        let _service = StandaloneRouter::start(&node, "bench", 1_000_000, pool).await?;
        let target = router_endpoint("bench", "best_worker_id");
        let address = node.discovery.list(&target).await?[0].address.clone();
        let bodies: Arc<Vec<Bytes>> = Arc::new(
            prompts
                .iter()
                .map(|p| Bytes::from(json!({"token_ids": p}).to_string()))
                .collect(),
        );
        let bar = if args.no_progress {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(args.calls as u64)
        };
        bar.set_style(ProgressStyle::with_template(
            "{bar:40} {pos}/{len} best_worker_id calls {elapsed}",
        )?);
        let per = args.calls.div_ceil(args.concurrency.max(1));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..args.concurrency.max(1) {
            let (node, address, bodies, bar) =
                (node.clone(), address.clone(), bodies.clone(), bar.clone());
            tasks.push(tokio::spawn(async move {
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                let mut overlap = 0u64;
                for k in 0..per {
                    let body = bodies[(c * per + k) % bodies.len()].clone();
                    let t = Instant::now();
                    let mut s = node.call(&address, body).await.expect("call");
                    let answer = s.next().await.expect("an answer").expect("no error");
                    h.record(t.elapsed().as_micros() as u64).expect("record");
                    let v: serde_json::Value = serde_json::from_slice(&answer).expect("JSON");
                    overlap += v["overlap_blocks"].as_u64().unwrap_or(0);
                    bar.inc(1);
                }
                (h, overlap)
            }));
        }
        let mut all = Histogram::<u64>::new(3)?;
        let mut overlap = 0;
        for t in tasks {
            let (h, o) = t.await?;
            all.add(&h)?;
            overlap += o;
        }
        let elapsed = start.elapsed();
        bar.finish_and_clear();
        let calls = all.len();
        let mut report = json!({
            "workers": args.workers,
            "indexed_blocks": indexed,
            "prompts": prompts.len(),
            "concurrency": args.concurrency,
            "calls": calls,
            "calls_per_s": calls as f64 / elapsed.as_secs_f64(),
            "latency_us": {"p50": all.value_at_quantile(0.5), "p90": all.value_at_quantile(0.9),
                           "p99": all.value_at_quantile(0.99), "max": all.max()},
            "mean_overlap_blocks": overlap as f64 / calls.max(1) as f64,
        });
        cancel.cancel();
        drop(registrations);
        if args.recovery_blocks > 0 {
            report["recovery"] =
                recovery(args.recovery_blocks, args.workers, args.block_size).await?;
        }
        println!("{report}");
        Ok(ExitCode::SUCCESS)
    })
}

/// Snapshot of `blocks` blocks, then the time a new router takes to recover it.
async fn recovery(
    blocks: usize,
    workers: u32,
    block_size: u32,
) -> anyhow::Result<serde_json::Value> {
    let nats = kvrouter_runtime::testing::NatsServer::start()
        .context("starting nats-server -js (install nats-server)")?;
    let events = kvrouter_runtime::events::NatsEvents::connect(&nats.url()).await?;
    let endpoint: EndpointId = "recovery.backend.generate"
        .parse()
        .map_err(anyhow::Error::msg)?;
    // An index of `blocks` blocks: chains of 64 random blocks spread over the workers.
    let source = router(block_size, KvRouterConfig::default());
    let chain = 64usize;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for c in 0..blocks.div_ceil(chain) {
        let n = chain.min(blocks - c * chain);
        let ev = RouterEvent::new(
            1 + c as u64 % u64::from(workers),
            KvCacheEvent {
                event_id: c as u64,
                data: KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: None,
                    blocks: (0..n)
                        .map(|_| KvCacheStoredBlockData {
                            block_hash: ExternalSequenceBlockHash(next()),
                            tokens_hash: kvrouter_core::LocalBlockHash(next()),
                            mm_extra_info: None,
                        })
                        .collect(),
                }),
                dp_rank: 0,
            },
        );
        source.apply_event(&ev);
    }
    anyhow::ensure!(
        source.index_size() == blocks,
        "source index has {} blocks",
        source.index_size()
    );
    let names = kvrouter_runtime::events::DurableNames::of(&endpoint);
    let stream = kvrouter_runtime::events::open_kv_stream(events.client(), &endpoint).await?;
    let store = stream.snapshots(&names.bucket).await?;
    let t = Instant::now();
    let dump = source.dump_events();
    let bytes = serde_json::to_vec(&dump)?;
    store
        .put(kvrouter_runtime::events::SNAPSHOT_OBJECT, &bytes)
        .await?;
    let snapshot_secs = t.elapsed().as_secs_f64();
    let restarted = router(
        block_size,
        KvRouterConfig {
            durable_kv_events: true,
            ..KvRouterConfig::default()
        },
    );
    let cancel = CancellationToken::new();
    let t = Instant::now();
    let rec = kvrouter_router::durable::start(
        events.client(),
        &endpoint,
        restarted.clone(),
        "bench-recovery".into(),
        cancel.clone(),
        None,
    )
    .await?;
    let recover_secs = t.elapsed().as_secs_f64();
    cancel.cancel();
    anyhow::ensure!(
        restarted.index_size() == blocks,
        "recovered {} of {blocks} blocks",
        restarted.index_size()
    );
    Ok(json!({
        "blocks": blocks,
        "snapshot_bytes": bytes.len(),
        "snapshot_events": rec.snapshot_events,
        "snapshot_upload_s": snapshot_secs,
        "recovery_s": recover_secs,
        "snapshot_apply_s": rec.snapshot_load.as_secs_f64(),
    }))
}
