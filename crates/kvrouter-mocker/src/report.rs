//! What a simulated run measured, per mode: percentiles, a table, JSON, an SVG.
//!
//! Definitions. TTFT: arrival to first token. ITL: gap between consecutive
//! tokens of one request. E2E: arrival to last token. Throughput figures use
//! the run's virtual makespan (first arrival to last token). `hit_rate`: prompt
//! tokens served from cache at admission / prompt tokens. `load_spread`: the
//! coefficient of variation (standard deviation / mean) across workers of the
//! tokens each computed (uncached prompt tokens + output tokens); 0 is perfect
//! balance. The oracle has only a hit rate.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::engine::TokenOutput;
use crate::sim::{SimMode, SimRequest};

/// The figures of one mode.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    /// Mode name.
    pub mode: String,
    /// Requests replayed.
    pub requests: usize,
    /// Time to first token, ms.
    pub ttft_p50_ms: Option<f64>,
    /// Time to first token, ms.
    pub ttft_p90_ms: Option<f64>,
    /// Time to first token, ms.
    pub ttft_p99_ms: Option<f64>,
    /// Inter-token latency, ms.
    pub itl_p50_ms: Option<f64>,
    /// Inter-token latency, ms.
    pub itl_p90_ms: Option<f64>,
    /// End-to-end latency, ms.
    pub e2e_p50_ms: Option<f64>,
    /// End-to-end latency, ms.
    pub e2e_p90_ms: Option<f64>,
    /// End-to-end latency, ms.
    pub e2e_p99_ms: Option<f64>,
    /// Output tokens per virtual second.
    pub output_tokens_per_s: Option<f64>,
    /// Completed requests per virtual second.
    pub requests_per_s: Option<f64>,
    /// Cached prompt tokens / prompt tokens.
    pub hit_rate: f64,
    /// Coefficient of variation of per-worker computed tokens.
    pub load_spread: Option<f64>,
    /// Requests preempted for lack of KV blocks.
    pub preemptions: usize,
    /// KV events the router's index rejected (0 when the engines are consistent).
    pub kv_event_errors: u64,
    /// Sorted TTFTs (ms), for plots.
    #[serde(skip)]
    pub ttft_sorted_ms: Vec<f64>,
}

/// Collects one mode's measurements as the simulation runs.
#[derive(Debug)]
pub struct Recorder {
    mode: SimMode,
    workers: usize,
    arrival: Vec<f64>,
    prompt: Vec<usize>,
    output: Vec<usize>,
    first: Vec<Option<f64>>,
    last: Vec<f64>,
    done: Vec<Option<f64>>,
    cached: Vec<usize>,
    worker: Vec<usize>,
    itl_us: Histogram<u64>,
    preemptions: usize,
}

impl Recorder {
    /// A recorder for `reqs`.
    pub fn new(mode: SimMode, reqs: &[SimRequest], workers: usize) -> Self {
        let n = reqs.len();
        Self {
            mode,
            workers,
            arrival: reqs.iter().map(|r| r.arrival_ms).collect(),
            prompt: reqs.iter().map(|r| r.prompt_tokens).collect(),
            output: reqs.iter().map(|r| r.output_tokens).collect(),
            first: vec![None; n],
            last: vec![0.0; n],
            done: vec![None; n],
            cached: vec![0; n],
            worker: vec![0; n],
            itl_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds"),
            preemptions: 0,
        }
    }

    /// Request `i` went to worker `w`.
    pub fn routed(&mut self, i: usize, w: usize) {
        self.worker[i] = w;
    }

    /// Preemptions in a pass.
    pub fn preempted(&mut self, n: usize) {
        self.preemptions += n;
    }

    /// The oracle's hit for request `i`.
    pub fn oracle_hit(&mut self, i: usize, cached_tokens: usize) {
        self.cached[i] = cached_tokens;
    }

    /// A token of request `i` at `now` (ms).
    pub fn token(&mut self, i: usize, now: f64, t: &TokenOutput) {
        if self.first[i].is_none() {
            self.first[i] = Some(now);
            self.cached[i] = t.cached_tokens;
        } else {
            let gap_us = ((now - self.last[i]) * 1000.0).round().max(1.0) as u64;
            self.itl_us.saturating_record(gap_us);
        }
        self.last[i] = now;
        if t.finished {
            self.done[i] = Some(now);
        }
    }

    /// The report.
    pub fn finish(self, kv_event_errors: u64) -> ModeReport {
        let n = self.arrival.len();
        let prompt_total: usize = self.prompt.iter().sum();
        let cached_total: usize = self.cached.iter().sum();
        let hit_rate = cached_total as f64 / prompt_total.max(1) as f64;
        let base = ModeReport {
            mode: self.mode.to_string(),
            requests: n,
            ttft_p50_ms: None,
            ttft_p90_ms: None,
            ttft_p99_ms: None,
            itl_p50_ms: None,
            itl_p90_ms: None,
            e2e_p50_ms: None,
            e2e_p90_ms: None,
            e2e_p99_ms: None,
            output_tokens_per_s: None,
            requests_per_s: None,
            hit_rate: round(hit_rate, 6),
            load_spread: None,
            preemptions: self.preemptions,
            kv_event_errors,
            ttft_sorted_ms: Vec::new(),
        };
        if self.mode == SimMode::Oracle || n == 0 {
            return base;
        }
        let mut ttft: Vec<f64> = (0..n)
            .filter_map(|i| self.first[i].map(|f| f - self.arrival[i]))
            .collect();
        let mut e2e: Vec<f64> = (0..n)
            .filter_map(|i| self.done[i].map(|d| d - self.arrival[i]))
            .collect();
        ttft.sort_by(f64::total_cmp);
        e2e.sort_by(f64::total_cmp);
        let start = self.arrival.iter().copied().fold(f64::INFINITY, f64::min);
        let end = self.done.iter().flatten().copied().fold(0.0, f64::max);
        let span_s = ((end - start) / 1000.0).max(1e-9);
        let out_tokens: usize = (0..n)
            .filter(|&i| self.done[i].is_some())
            .map(|i| self.output[i])
            .sum();
        let mut work = vec![0f64; self.workers];
        for i in 0..n {
            work[self.worker[i]] += (self.prompt[i] - self.cached[i] + self.output[i]) as f64;
        }
        let mean = work.iter().sum::<f64>() / self.workers.max(1) as f64;
        let var = work.iter().map(|w| (w - mean).powi(2)).sum::<f64>() / self.workers.max(1) as f64;
        let itl = |q: f64| round(self.itl_us.value_at_quantile(q) as f64 / 1000.0, 3);
        ModeReport {
            ttft_p50_ms: pct(&ttft, 0.50),
            ttft_p90_ms: pct(&ttft, 0.90),
            ttft_p99_ms: pct(&ttft, 0.99),
            itl_p50_ms: (!self.itl_us.is_empty()).then(|| itl(0.50)),
            itl_p90_ms: (!self.itl_us.is_empty()).then(|| itl(0.90)),
            e2e_p50_ms: pct(&e2e, 0.50),
            e2e_p90_ms: pct(&e2e, 0.90),
            e2e_p99_ms: pct(&e2e, 0.99),
            output_tokens_per_s: Some(round(out_tokens as f64 / span_s, 3)),
            requests_per_s: Some(round(e2e.len() as f64 / span_s, 3)),
            load_spread: Some(round(var.sqrt() / mean.max(1e-9), 6)),
            ttft_sorted_ms: ttft,
            ..base
        }
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(round(sorted[rank - 1], 3))
}

/// A fixed-width table of the reports.
pub fn table(reports: &[ModeReport]) -> String {
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let mut out = format!(
        "{:<12} {:>8} {:>10} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10} {:>9} {:>8} {:>7}\n",
        "mode",
        "requests",
        "ttft_p50",
        "ttft_p90",
        "ttft_p99",
        "itl_p50",
        "itl_p90",
        "e2e_p50",
        "e2e_p90",
        "out_tok/s",
        "hit",
        "spread"
    );
    for r in reports {
        out.push_str(&format!(
            "{:<12} {:>8} {:>10} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10} {:>9} {:>7.1}% {:>7}\n",
            r.mode,
            r.requests,
            f(r.ttft_p50_ms),
            f(r.ttft_p90_ms),
            f(r.ttft_p99_ms),
            f(r.itl_p50_ms),
            f(r.itl_p90_ms),
            f(r.e2e_p50_ms),
            f(r.e2e_p90_ms),
            f(r.output_tokens_per_s),
            r.hit_rate * 100.0,
            r.load_spread.map_or("-".into(), |s| format!("{s:.3}")),
        ));
    }
    out
}
