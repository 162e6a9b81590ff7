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
//! load bound; [`kvrouter_core::sticky`]) and `oracle`: the hit rate of one
//! cache pooling every worker's capacity under the same LRU policy, as if any
//! request could use any block anywhere, with no load balance and no
//! concurrency: a bound on reuse, not a router (it has no latencies).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use kvrouter_core::hash::{LocalBlockHash, SequenceHash};
use kvrouter_core::index::{ApproxIndex, KvIndex, RadixIndex};
use kvrouter_core::protocols::{RouterEvent, WorkerKey};
use kvrouter_core::queue::{RouterQueue, all_saturated};
use kvrouter_core::schedule::{KvPolicy, Pipeline, RankFilter};
use kvrouter_core::selection::{choice_name, parse_choice};
use kvrouter_core::sequences::SequenceTracker;
use kvrouter_core::{KvRouterConfig, RouterMode};
use parking_lot::Mutex;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::blocks::{BlockManager, FullBlock};
use crate::engine::{Engine, EngineConfig, EngineRequest};
use crate::report::{ModeReport, Recorder};
use crate::trace::{PromptBuilder, TraceRequest};

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
    /// Pooled-cache bound on reuse.
    Oracle,
}

impl SimMode {
    /// Every mode, by name.
    pub const ALL: [(SimMode, &'static str); 6] = [
        (SimMode::RoundRobin, "round-robin"),
        (SimMode::Random, "random"),
        (SimMode::Kv, "kv"),
        (SimMode::KvApprox, "kv-approx"),
        (SimMode::KvSticky, "kv-sticky"),
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
        return oracle(cfg, reqs, progress);
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
    // The live router's pipeline and index forms; `None` for the load-blind modes.
    let policy = match mode {
        SimMode::KvSticky => KvPolicy::Sticky {
            spill: cfg.router.router_sticky_spill,
        },
        _ => KvPolicy::Cost,
    };
    let pipeline = Pipeline::new(bs, cfg.router.clone()).with_policy(policy);
    let index: Option<Box<dyn KvIndex>> = match mode {
        SimMode::Kv | SimMode::KvSticky => Some(Box::new(Mutex::new(RadixIndex::new()))),
        SimMode::KvApprox => Some(Box::new(Mutex::new(ApproxIndex::new(
            cfg.router.prune_config(),
        )))),
        _ => None,
    };
    let params = pipeline.params(None);
    let no_busy = HashSet::new();
    let all_ranks: Vec<WorkerKey> = (0..slots).map(key_of).collect();
    let mut rr = 0usize;
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
        .filter(|_| index.is_some())
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
                // Only `kv` hears the engines; `kv-approx` learns from its own routing.
                if let (SimMode::Kv | SimMode::KvSticky, Some(index)) = (mode, &index) {
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
            let plan = match &index {
                None => {
                    let plain = match mode {
                        SimMode::Random => RouterMode::Random,
                        _ => RouterMode::RoundRobin,
                    };
                    let ranks = all_ranks.clone();
                    pipeline.select_plain(
                        plain,
                        r.prompt_tokens,
                        ranks,
                        &no_busy,
                        &mut rr,
                        &mut rng,
                    )
                }
                Some(index) => {
                    let at = instant(now);
                    let overlaps = pipeline.lookup(index.as_ref(), &r.local, at);
                    let hashes = pipeline.tracking_hashes(&r.local, &params, &mut rng);
                    let filter = RankFilter {
                        allowed: None,
                        busy: &no_busy,
                    };
                    let plan = pipeline.select_kv(
                        r.prompt_tokens,
                        &r.local,
                        &params,
                        hashes,
                        &overlaps,
                        &tracker,
                        filter,
                        &mut rng,
                    );
                    if let Ok(plan) = &plan {
                        let _ = pipeline.commit(
                            index.as_ref(),
                            &mut tracker,
                            &ids[i],
                            &r.local,
                            plan,
                            None,
                            at,
                        );
                    }
                    plan
                }
            }
            .expect("every simulated rank is a candidate");
            let w = plan.worker.worker_id as usize * dp + plan.worker.dp_rank as usize;
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
    rec.finish(index.map_or(0, |i| i.event_errors()))
}

/// The pooled-cache bound: one LRU cache of every worker's capacity.
fn oracle(cfg: &SimConfig, reqs: &[SimRequest], progress: &ProgressBar) -> ModeReport {
    let bs = cfg.engine.block_size;
    let slots = cfg.workers * cfg.data_parallel_size.max(1);
    let mut cache = BlockManager::new(slots * cfg.engine.num_gpu_blocks, true);
    let mut rec = Recorder::new(SimMode::Oracle, reqs, slots);
    for (i, r) in reqs.iter().enumerate() {
        let names: Vec<u64> = r.seq.iter().map(|h| h.0).collect();
        let mut cached = cache.cached_prefix(&names);
        if cached * bs >= r.prompt_tokens {
            cached = (r.prompt_tokens - 1) / bs;
        }
        rec.oracle_hit(i, (cached * bs).min(r.prompt_tokens));
        // Use the request's blocks (prompt, then its unique output blocks), then release them.
        for h in &names[..cached] {
            cache.acquire(*h);
        }
        let total_blocks = (r.prompt_tokens + r.output_tokens).div_ceil(bs);
        let mut held: Vec<u64> = names[..cached].to_vec();
        for k in cached..total_blocks {
            if !cache.allocate_partial() {
                break;
            }
            let name = names
                .get(k)
                .copied()
                .unwrap_or(((i as u64) << 24) ^ (k as u64) ^ 0x5eed_0000_0000_0000);
            cache.promote(name);
            held.push(name);
        }
        for h in held.iter().rev() {
            cache.release(*h);
        }
        cache.take_events();
        progress.inc(1);
    }
    rec.finish(0)
}
