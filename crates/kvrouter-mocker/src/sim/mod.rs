//! The offline cluster simulator: a trace through N engines and the real router
//! core, in virtual time.
//!
//! Events are request arrivals (trace timestamps divided by the arrival speed-
//! up) and engine passes finishing. At an arrival the request is routed by the
//! mode under test and queued on its engine; an idle engine plans its next pass
//! at once. At the end of a pass its tokens are recorded (TTFT, inter-token
//! gaps, end-to-end), its KV events are applied to the router's index, and the
//! router's active sequences are updated (first token → prefill done, last →
//! free), exactly as the frontend would. Nothing sleeps: a production hour
//! replays in seconds, and every mode sees the identical arrival sequence.
//!
//! Modes: `round-robin`, `random`, `kv` (index fed only by the engines' own
//! events), `kv-approx` (no events: the approximate index learns from routing
//! decisions), `kv-sticky` (events, prefix families kept together within a
//! load bound; [`kvrouter_core::sticky`]); the peers' documented policies
//! `sglang-cache-aware`, `prefix-hash` and `llm-d` ([`kvrouter_core::peers`]);
//! and `oracle` ([`oracle`]): the hit rate of one cache pooling every worker's
//! capacity under the same LRU policy, a bound on reuse, not a router. How
//! each mode picks a rank lives in [`route`].

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use kvrouter_core::KvRouterConfig;
use kvrouter_core::hash::{LocalBlockHash, SequenceHash};
use kvrouter_core::protocols::{RouterEvent, WorkerKey};
use kvrouter_core::queue::{RouterQueue, all_saturated};
use kvrouter_core::selection::{choice_name, parse_choice};
use kvrouter_core::sequences::SequenceTracker;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::blocks::FullBlock;
use crate::engine::{Engine, EngineConfig, EngineRequest};
use crate::report::{ModeReport, Recorder};
use crate::trace::{PromptBuilder, TraceRequest};

mod oracle;
mod route;

use route::SimRouter;

/// A routing mode under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimMode {
    /// Each worker in turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// KV-aware, index fed by the engines' KV events.
    Kv,
    /// KV-aware without events (approximate index).
    KvApprox,
    /// `kv-sticky`: prefix families kept together within a load bound (events).
    KvSticky,
    /// sglang-router / SMG `cache_aware` (approximate tree, imbalance gate).
    SglangCacheAware,
    /// SMG `prefix_hash`: consistent hashing of the prefix with bounded load.
    PrefixHash,
    /// llm-d's prefix, queue and KV-utilisation scorers (events).
    Llmd,
    /// Pooled-cache bound on reuse.
    Oracle,
}

impl SimMode {
    /// Every mode, by name.
    pub const ALL: [(SimMode, &'static str); 9] = [
        (SimMode::RoundRobin, "round-robin"),
        (SimMode::Random, "random"),
        (SimMode::Kv, "kv"),
        (SimMode::KvApprox, "kv-approx"),
        (SimMode::KvSticky, "kv-sticky"),
        (SimMode::SglangCacheAware, "sglang-cache-aware"),
        (SimMode::PrefixHash, "prefix-hash"),
        (SimMode::Llmd, "llm-d"),
        (SimMode::Oracle, "oracle"),
    ];
}

impl fmt::Display for SimMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(choice_name(self, &Self::ALL))
    }
}

impl FromStr for SimMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_choice(s, &Self::ALL, "mode")
    }
}

/// Everything a simulation run needs besides the trace.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Workers.
    pub workers: usize,
    /// Data-parallel ranks per worker (each rank is an engine with its own cache).
    pub data_parallel_size: usize,
    /// Engine settings.
    pub engine: EngineConfig,
    /// Router settings (weight, temperature, tracking, approximate TTL…).
    pub router: KvRouterConfig,
    /// Arrival-rate multiplier: timestamps are divided by it.
    pub arrival_speedup: f64,
    /// Seed of every random choice.
    pub seed: u64,
}

/// A trace request, prepared once for every mode.
#[derive(Debug, Clone)]
pub struct SimRequest {
    /// Arrival in virtual ms.
    pub arrival_ms: f64,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens to generate.
    pub output_tokens: usize,
    /// The prompt's full blocks: content hashes.
    pub local: Vec<LocalBlockHash>,
    /// The prompt's full blocks: rolling sequence hashes.
    pub seq: Vec<SequenceHash>,
}

/// Hashes every trace request at the engine block size (done once, shared by all modes).
pub fn prepare(trace: &[TraceRequest], block_size: usize, arrival_speedup: f64) -> Vec<SimRequest> {
    let mut builder = PromptBuilder::new(block_size);
    let t0 = trace.first().map_or(0.0, |r| r.timestamp);
    trace
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (local, seq) = builder.hashes(r, i as u64);
            SimRequest {
                arrival_ms: (r.timestamp - t0) / arrival_speedup,
                prompt_tokens: r.input_length,
                output_tokens: r.output_length.max(1),
                local,
                seq,
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct At(f64, u64);

impl Eq for At {}
impl Ord for At {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (time, sequence number): ties resolve in a fixed order.
        o.0.total_cmp(&self.0).then(o.1.cmp(&self.1))
    }
}
impl PartialOrd for At {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival(usize),
    StepDone(usize),
}

/// Runs one mode over the prepared requests.
pub fn run(
    mode: SimMode,
    cfg: &SimConfig,
    reqs: &[SimRequest],
    progress: &ProgressBar,
) -> ModeReport {
    if mode == SimMode::Oracle {
        return oracle::oracle(cfg, reqs, progress);
    }
    let bs = cfg.engine.block_size;
    // One engine per (worker, rank); slot = worker × dp + rank.
    let dp = cfg.data_parallel_size.max(1);
    let slots = cfg.workers * dp;
    let key_of = |slot: usize| WorkerKey::new((slot / dp) as u64, (slot % dp) as u32);
    let mut engines: Vec<Engine> = (0..slots)
        .map(|s| {
            let k = key_of(s);
            Engine::new(cfg.engine, k.worker_id, k.dp_rank)
        })
        .collect();
    let mut busy = vec![false; slots];
    let mut router = SimRouter::new(mode, bs, &cfg.router, (0..slots).map(key_of).collect());
    let mut tracker = SequenceTracker::new(bs);
    for s in 0..slots {
        tracker.add_worker(key_of(s));
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut rec = Recorder::new(mode, reqs, slots);
    let mut heap = BinaryHeap::new();
    let mut seqno = 0u64;
    let mut push = |heap: &mut BinaryHeap<(At, Ev)>, t: f64, e: Ev| {
        seqno += 1;
        heap.push((At(t, seqno), e));
    };
    for (i, r) in reqs.iter().enumerate() {
        push(&mut heap, r.arrival_ms, Ev::Arrival(i));
    }
    // The approximate index measures time with `Instant`s: map virtual ms onto one.
    let base = Instant::now();
    let instant = |ms: f64| base + Duration::from_secs_f64(ms.max(0.0) / 1000.0);
    let mut ids = vec![String::new(); reqs.len()];
    // The router queue (KV modes with `router_queue_threshold`), as the live
    // router runs it: held while every rank is saturated, released as load falls.
    let max_batched = cfg.engine.max_num_batched_tokens as u64;
    let saturated = |theta: f64, t: &SequenceTracker| {
        let load = (0..slots).map(|s| {
            (
                t.get(key_of(s)).map_or(0, |a| a.active_tokens()),
                max_batched,
            )
        });
        all_saturated(theta, load)
    };
    let mut queue = cfg
        .router
        .router_queue_threshold
        .filter(|_| router.queues())
        .map(|theta| {
            (
                RouterQueue::new(cfg.router.router_queue_policy, instant(0.0)),
                theta,
            )
        });
    while let Some((At(now, _), ev)) = heap.pop() {
        let mut arrival = None;
        match ev {
            Ev::Arrival(i) => arrival = Some(i),
            Ev::StepDone(w) => {
                let result = engines[w].finish_step();
                rec.preempted(result.preempted);
                // Only modes fed by events hear the engines; the others learn
                // from their own routing.
                if let Some(index) = router.event_index() {
                    for event in result.events {
                        // Counted in the index's stats; the report checks they are all clean.
                        let ev = RouterEvent::new(key_of(w).worker_id, event);
                        let _ = index.apply_event(&ev, instant(now));
                    }
                }
                for t in &result.tokens {
                    let i = t.request as usize;
                    rec.token(i, now, t);
                    if t.generated == 1 {
                        let _ = tracker.mark_prefill_completed(&ids[i]);
                    }
                    if t.finished {
                        let _ = tracker.free(&ids[i]);
                        progress.inc(1);
                    }
                }
                busy[w] = false;
                if let Some(d) = engines[w].plan_step() {
                    busy[w] = true;
                    push(&mut heap, now + d, Ev::StepDone(w));
                }
            }
        }
        // Route the arrival, then whatever the queue may release now.
        loop {
            let i = match (arrival.take(), &mut queue) {
                (Some(i), Some((q, theta))) if !q.is_empty() || saturated(*theta, &tracker) => {
                    let r = &reqs[i];
                    q.push(r.prompt_tokens, Duration::ZERO, instant(r.arrival_ms), i);
                    continue;
                }
                (Some(i), _) => i,
                (None, Some((q, theta))) if !q.is_empty() && !saturated(*theta, &tracker) => {
                    q.pop().expect("not empty")
                }
                (None, _) => break,
            };
            let r = &reqs[i];
            ids[i] = format!("r{i}");
            let w = router.route(&ids[i], r, instant(now), &mut tracker, &engines, &mut rng);
            rec.routed(i, w);
            engines[w].add_request(EngineRequest {
                id: i as u64,
                prompt_tokens: r.prompt_tokens,
                prompt_blocks: r
                    .local
                    .iter()
                    .zip(&r.seq)
                    .map(|(l, s)| FullBlock {
                        seq: s.0,
                        local: l.0,
                    })
                    .collect(),
                max_tokens: r.output_tokens,
            });
            if !busy[w]
                && let Some(d) = engines[w].plan_step()
            {
                busy[w] = true;
                push(&mut heap, now + d, Ev::StepDone(w));
            }
        }
    }
    rec.finish(router.event_errors())
}
