//! `kvrouter bench chat`: an open-loop streaming chat load with shared system
//! prompts, for comparing routers in front of the same engines.
//!
//! `--groups` system prompts (each about `--system-words` words, different
//! per group) are shared by the requests of their group; each request adds a
//! short question of its own. Arrivals are Poisson at `--rate` per second
//! (seeded, so every router sees the same sequence) and the group of each
//! request is drawn uniformly. Requests stream (`stream: true`) with
//! `ignore_eos`, so every answer has `--max-tokens` tokens. TTFT is the time
//! to the first SSE event carrying content; a request fails on a non-200, an
//! error event, or a stream that ends without `data: [DONE]`. One JSON line.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

/// `kvrouter bench chat` flags.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// Base URL of the OpenAI API.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Model name to request.
    #[arg(long, default_value = "mock-model")]
    pub model: String,
    /// Shared system prompts.
    #[arg(long, default_value_t = 31)]
    pub groups: usize,
    /// Words per system prompt.
    #[arg(long, default_value_t = 600)]
    pub system_words: usize,
    /// Requests to send.
    #[arg(long, default_value_t = 600)]
    pub requests: usize,
    /// Arrivals per second (Poisson).
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// Seed of arrivals, groups and questions.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

const WORDS: &[&str] = &[
    "router",
    "cache",
    "prefix",
    "engine",
    "block",
    "token",
    "stream",
    "index",
    "worker",
    "load",
    "event",
    "replay",
    "latency",
    "throughput",
    "memory",
    "policy",
    "request",
    "answer",
    "model",
    "shard",
    "queue",
    "lease",
    "kernel",
    "batch",
    "decode",
    "prefill",
    "context",
    "window",
];

fn text(rng: &mut StdRng, words: usize) -> String {
    (0..words)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

struct Outcome {
    ttft: Option<Duration>,
    /// Why it failed.
    error: Option<String>,
}

async fn one(client: reqwest::Client, url: String, body: serde_json::Value) -> Outcome {
    let started = Instant::now();
    let fail = |ttft, e: String| Outcome {
        ttft,
        error: Some(e),
    };
    let resp = match client.post(&url).json(&body).send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            return fail(None, format!("{status}: {text}"));
        }
        Err(e) => return fail(None, e.to_string()),
    };
    let mut events = resp.bytes_stream().eventsource();
    let mut ttft = None;
    let mut done = false;
    while let Some(ev) = events.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => return fail(ttft, e.to_string()),
        };
        if ev.data == "[DONE]" {
            done = true;
            break;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&ev.data) else {
            return fail(ttft, format!("not JSON: {}", ev.data));
        };
        if v.get("error").is_some() {
            return fail(ttft, ev.data);
        }
        let content = v
            .pointer("/choices/0/delta/content")
            .and_then(|c| c.as_str())
            .is_some_and(|c| !c.is_empty());
        if ttft.is_none() && content {
            ttft = Some(started.elapsed());
        }
    }
    Outcome {
        ttft,
        error: (!done).then(|| "the stream ended without [DONE]".to_string()),
    }
}

/// Runs the load and prints one JSON line.
pub fn run(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let mut rng = StdRng::seed_from_u64(args.seed);
        let systems: Vec<String> = (0..args.groups)
            .map(|g| format!("You are assistant number {g}. {}", text(&mut rng, args.system_words)))
            .collect();
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(1024)
            .build()?;
        let url = format!("{}/v1/chat/completions", args.url.trim_end_matches('/'));
        let bar = if args.no_progress {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(args.requests as u64).with_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} requests ({elapsed})")
                    .expect("valid template"),
            )
        };
        let begun = Instant::now();
        let mut at = Duration::ZERO;
        let mut tasks = Vec::with_capacity(args.requests);
        for _ in 0..args.requests {
            // Exponential inter-arrival times: a Poisson process at `rate`.
            let u: f64 = rng.random::<f64>().max(1e-12);
            at += Duration::from_secs_f64(-u.ln() / args.rate);
            let g = rng.random_range(0..args.groups);
            let body = json!({
                "model": args.model, "stream": true, "max_tokens": args.max_tokens,
                "ignore_eos": true,
                "messages": [
                    {"role": "system", "content": systems[g]},
                    {"role": "user", "content": text(&mut rng, 12)},
                ],
            });
            tokio::time::sleep_until(tokio::time::Instant::from_std(begun + at)).await;
            let (c, u, b) = (client.clone(), url.clone(), bar.clone());
            tasks.push(tokio::spawn(async move {
                let o = one(c, u, body).await;
                b.inc(1);
                o
            }));
        }
        let mut ttft = Histogram::<u64>::new(3).expect("valid histogram");
        let (mut ok, mut failed) = (0usize, 0usize);
        for t in tasks {
            let o = t.await?;
            match &o.error {
                None => ok += 1,
                Some(e) => {
                    failed += 1;
                    if failed <= 5 {
                        eprintln!("kvrouter bench chat: request failed: {e}");
                    }
                }
            }
            if let Some(d) = o.ttft {
                ttft.record(d.as_micros() as u64).ok();
            }
        }
        bar.finish_and_clear();
        let q = |p: f64| ttft.value_at_quantile(p) as f64 / 1e3;
        println!(
            "{}",
            json!({
                "url": args.url, "requests": args.requests, "ok": ok, "failed": failed,
                "rate": args.rate, "groups": args.groups, "elapsed_s": begun.elapsed().as_secs_f64(),
                "ttft_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99)},
            })
        );
        Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    })
}
