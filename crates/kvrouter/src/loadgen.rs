//! `kvrouter bench http`: an open-loop HTTP load generator replaying a
//! Mooncake trace against an OpenAI endpoint, then reading the server's own
//! routing-overhead histogram from `/metrics`.
//!
//! Each trace request is sent at its recorded time divided by `--speedup`,
//! whether or not earlier ones finished (open loop, so a slow server cannot
//! slow the arrivals down). Prompts are token ids (`/v1/completions` with a
//! token-list prompt): the trace's 512-token block ids become deterministic
//! tokens, so requests sharing block ids share prefixes exactly as recorded.
//! Client-side TTFT and end-to-end latency are measured per request; routing
//! overhead percentiles are interpolated from the server's histogram.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// Tokens per trace block (the Mooncake trace's block size).
const TRACE_BLOCK: usize = 512;

/// `kvrouter bench http` flags.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Base URL of the OpenAI API (`http://127.0.0.1:8000`).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Mooncake-style JSONL trace.
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,
    /// Model name to request.
    #[arg(long, default_value = "mock-model")]
    pub model: String,
    /// Arrival-rate multiplier.
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// Replay only the first N requests.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Cap on generated tokens per request (the trace's output length otherwise).
    #[arg(long, default_value_t = 16)]
    pub max_output: usize,
    /// Cap on prompt tokens per request.
    #[arg(long, default_value_t = 8192)]
    pub max_input: usize,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// `n` deterministic tokens for trace block `id`.
pub fn tokens_of_block(id: u64, out: &mut Vec<u32>, n: usize) {
    // Deterministic tokens per block id, in the built-in tokenizer's ordinary range.
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5eed;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(3 + (x % 4093) as u32);
    }
}

#[derive(Default)]
struct Outcome {
    ok: bool,
    ttft_us: u64,
    e2e_us: u64,
    lateness_us: u64,
}

async fn one(
    client: reqwest::Client,
    url: String,
    body: serde_json::Value,
    lateness: Duration,
) -> Outcome {
    let start = Instant::now();
    let mut o = Outcome {
        lateness_us: lateness.as_micros() as u64,
        ..Outcome::default()
    };
    let Ok(resp) = client.post(&url).json(&body).send().await else {
        return o;
    };
    if !resp.status().is_success() {
        return o;
    }
    let mut stream = resp.bytes_stream();
    let mut first = true;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { return o };
        if first && chunk.windows(6).any(|w| w == b"data: ") {
            o.ttft_us = start.elapsed().as_micros() as u64;
            first = false;
        }
        if chunk.windows(6).any(|w| w == b"[DONE]") {
            o.ok = true;
        }
    }
    o.e2e_us = start.elapsed().as_micros() as u64;
    o
}

/// Percentiles of the server's `dynamo_routing_overhead_total_ms` histogram.
fn overhead_from_metrics(text: &str, name: &str) -> serde_json::Value {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let mut count = 0.0;
    let mut sum = 0.0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{le=\"")) {
            let (le, v) = rest.split_once("\"} ").unwrap_or(("", ""));
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(0.0)
            };
            buckets.push((le, v.trim().parse().unwrap_or(0.0)));
        } else if let Some(v) = line.strip_prefix(&format!("{name}_count ")) {
            count = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix(&format!("{name}_sum ")) {
            sum = v.trim().parse().unwrap_or(0.0);
        }
    }
    // Linear interpolation inside the bucket holding the quantile.
    let q = |p: f64| -> f64 {
        let target = p * count;
        let mut prev = (0.0, 0.0);
        for &(le, c) in &buckets {
            if c >= target {
                if !le.is_finite() {
                    return prev.0;
                }
                let frac = if c > prev.1 {
                    (target - prev.1) / (c - prev.1)
                } else {
                    1.0
                };
                return prev.0 + frac * (le - prev.0);
            }
            prev = (le, c);
        }
        prev.0
    };
    json!({
        "count": count,
        "mean_us": if count > 0.0 { sum / count * 1e3 } else { 0.0 },
        "p50_us": q(0.5) * 1e3, "p90_us": q(0.9) * 1e3, "p99_us": q(0.99) * 1e3,
    })
}

/// Runs the replay and prints one JSON line.
pub fn run(args: HttpArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.speedup.is_finite() && args.speedup > 0.0,
        "--speedup must be > 0"
    );
    let trace = kvrouter_mocker::trace::load(&args.trace, args.limit)
        .with_context(|| format!("reading {}", args.trace.display()))?;
    anyhow::ensure!(!trace.is_empty(), "the trace is empty");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()?;
        let base = args.url.trim_end_matches('/').to_string();
        let before = client.get(format!("{base}/metrics")).send().await?.text().await?;
        let before = overhead_from_metrics(&before, "dynamo_routing_overhead_total_ms");
        let url = format!("{base}/v1/completions");
        let t0 = trace[0].timestamp;
        let bar = if args.no_progress {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(trace.len() as u64)
        };
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} requests sent, {elapsed} {msg}")
                .expect("valid template"),
        );
        let start = tokio::time::Instant::now();
        let mut handles = Vec::with_capacity(trace.len());
        let mut prompt_tokens = 0usize;
        for r in &trace {
            let mut tokens = Vec::with_capacity(r.input_length.min(args.max_input));
            for (k, id) in r.hash_ids.iter().enumerate() {
                let n = TRACE_BLOCK.min(r.input_length.saturating_sub(k * TRACE_BLOCK));
                tokens_of_block(*id, &mut tokens, n);
            }
            tokens.truncate(args.max_input);
            if tokens.is_empty() {
                tokens.push(3);
            }
            prompt_tokens += tokens.len();
            let body = json!({
                "model": args.model, "prompt": tokens, "stream": true,
                "max_tokens": r.output_length.clamp(1, args.max_output), "ignore_eos": true,
            });
            let at = start + Duration::from_secs_f64((r.timestamp - t0) / args.speedup / 1e3);
            tokio::time::sleep_until(at).await;
            let lateness = tokio::time::Instant::now().saturating_duration_since(at);
            handles.push(tokio::spawn(one(client.clone(), url.clone(), body, lateness)));
            bar.inc(1);
        }
        let sent_in = start.elapsed();
        bar.set_message("waiting for the last responses");
        let mut ttft = Histogram::<u64>::new(3)?;
        let mut e2e = Histogram::<u64>::new(3)?;
        let mut late = Histogram::<u64>::new(3)?;
        let mut failed = 0usize;
        for h in handles {
            let o = h.await?;
            late.record(o.lateness_us)?;
            if o.ok {
                ttft.record(o.ttft_us.max(1))?;
                e2e.record(o.e2e_us.max(1))?;
            } else {
                failed += 1;
            }
        }
        bar.finish_and_clear();
        let elapsed = start.elapsed();
        let after = client.get(format!("{base}/metrics")).send().await?.text().await?;
        let overhead = overhead_from_metrics(&after, "dynamo_routing_overhead_total_ms");
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
        let report = json!({
            "requests": trace.len(),
            "failed": failed,
            "offered_rps": trace.len() as f64 / sent_in.as_secs_f64().max(1e-9),
            "achieved_rps": (trace.len() - failed) as f64 / elapsed.as_secs_f64(),
            "mean_prompt_tokens": prompt_tokens as f64 / trace.len() as f64,
            "client_ttft_ms": {"p50": ms(&ttft, 0.5), "p90": ms(&ttft, 0.9), "p99": ms(&ttft, 0.99)},
            "client_e2e_ms": {"p50": ms(&e2e, 0.5), "p99": ms(&e2e, 0.99)},
            "send_lateness_ms": {"p50": ms(&late, 0.5), "p99": ms(&late, 0.99)},
            "routing_overhead_before": before,
            "routing_overhead": overhead,
        });
        println!("{report}");
        Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    })
}
