//! Replaying a workload against an index and reporting one JSON line.

use std::time::Instant;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::load::{Op, Workload};
use crate::measure;

/// An index that can replay kv-ops/1 (one adapter per implementation).
pub trait ReplayTarget {
    /// Applies a store; false when the index rejected it.
    fn store(&mut self, worker: u64, parent: Option<u64>, blocks: &[u64]) -> bool;
    /// Applies a remove; false when the index reported an error.
    fn remove(&mut self, worker: u64, blocks: &[u64]) -> bool;
    /// Applies a clear; false when the index reported an error.
    fn clear(&mut self, worker: u64) -> bool;
    /// Looks up a chain; appends `(worker, overlap)` for every worker with overlap > 0.
    fn query(&mut self, blocks: &[u64], out: &mut Vec<(u64, u32)>);
    /// Waits for queued work and returns errors not reported per op (asynchronous backends).
    fn finish(&mut self) -> u64 {
        0
    }
}

/// The result line of `bench index`; keys in this order.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Implementation (`kvrouter`, `dynamo-kv-router`).
    #[serde(rename = "impl")]
    pub implementation: String,
    /// Backend (`single`, `concurrent`).
    pub backend: String,
    /// Ops replayed.
    pub ops: u64,
    /// Hashes in all store, remove and query ops.
    pub block_ops: u64,
    /// Wall time of the replay.
    pub seconds: f64,
    /// `block_ops / seconds`.
    pub block_ops_per_sec: f64,
    /// Process CPU time during the replay (all threads).
    pub cpu_seconds: f64,
    /// Median query latency.
    pub query_p50_us: f64,
    /// 99th percentile query latency.
    pub query_p99_us: f64,
    /// Slowest query.
    pub query_max_us: f64,
    /// Queries whose every per-worker overlap matched `expect`.
    pub correct_queries: u64,
    /// Queries replayed.
    pub queries: u64,
    /// Events the index rejected or reported as errors.
    pub apply_errors: u64,
    /// RSS after loading, before the replay.
    pub rss_before_replay_mb: f64,
    /// Peak RSS during the replay (index memory ≈ peak − before).
    pub peak_rss_mb: f64,
}

/// Ops between progress-bar updates (keeps the bar off the hot path).
const PROGRESS_STEP: u64 = 16_384;

/// Replays `workload` against `target` and measures it.
pub fn replay(
    workload: &Workload,
    target: &mut dyn ReplayTarget,
    implementation: &str,
    backend: &str,
    progress: bool,
) -> Report {
    let bar = if progress {
        let bar = ProgressBar::new(workload.ops.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} ops ({per_sec}, eta {eta})",
            )
            .expect("static template"),
        );
        bar.set_prefix(format!("{implementation}/{backend}"));
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("static bounds");
    let mut got = Vec::with_capacity(64);
    let (mut queries, mut correct, mut errors) = (0u64, 0u64, 0u64);
    let rss_before = measure::rss_mb();
    measure::reset_peak_rss();
    let cpu0 = measure::cpu_seconds();
    let t0 = Instant::now();
    for (i, op) in workload.ops.iter().enumerate() {
        match op {
            Op::Query { blocks, expect } => {
                got.clear();
                let q0 = Instant::now();
                target.query(blocks, &mut got);
                let ns = q0.elapsed().as_nanos() as u64;
                hist.saturating_record(ns.max(1));
                queries += 1;
                got.sort_unstable();
                if got[..] == expect[..] {
                    correct += 1;
                }
            }
            Op::Store {
                worker,
                parent,
                blocks,
            } => errors += u64::from(!target.store(*worker, *parent, blocks)),
            Op::Remove { worker, blocks } => errors += u64::from(!target.remove(*worker, blocks)),
            Op::Clear { worker } => errors += u64::from(!target.clear(*worker)),
        }
        if (i as u64 + 1) % PROGRESS_STEP == 0 {
            bar.set_position(i as u64 + 1);
        }
    }
    errors += target.finish();
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_seconds = measure::cpu_seconds() - cpu0;
    let peak = measure::peak_rss_mb();
    bar.finish_and_clear();
    let us = |ns: u64| ns as f64 / 1000.0;
    Report {
        implementation: implementation.to_string(),
        backend: backend.to_string(),
        ops: workload.ops.len() as u64,
        block_ops: workload.block_ops,
        seconds,
        block_ops_per_sec: workload.block_ops as f64 / seconds.max(1e-9),
        cpu_seconds,
        query_p50_us: us(hist.value_at_quantile(0.50)),
        query_p99_us: us(hist.value_at_quantile(0.99)),
        query_max_us: us(hist.max()),
        correct_queries: correct,
        queries,
        apply_errors: errors,
        rss_before_replay_mb: rss_before,
        peak_rss_mb: peak,
    }
}
