//! Engine behaviour (prefix hits, chunked prefill, preemption), the KV-event
//! replay property, and simulator determinism.

use std::collections::HashSet;

use indicatif::ProgressBar;
use kvrouter_core::protocols::{KvCacheEventData, RouterEvent};
use kvrouter_core::{KvRouterConfig, RadixIndex, WorkerKey};
use kvrouter_mocker::blocks::FullBlock;
use kvrouter_mocker::engine::{Engine, EngineConfig, EngineRequest};
use kvrouter_mocker::sim::{self, SimConfig, SimMode};
use kvrouter_mocker::trace::TraceRequest;
use proptest::prelude::*;

fn cfg(blocks: usize, bs: usize, batched: usize) -> EngineConfig {
    EngineConfig {
        num_gpu_blocks: blocks,
        block_size: bs,
        max_num_seqs: 16,
        max_num_batched_tokens: batched,
        watermark: 0.0,
        ..EngineConfig::default()
    }
}

/// A prompt whose full blocks are named by `names` (shared names = shared prefix).
fn request(id: u64, names: &[u64], bs: usize, extra_tokens: usize, out: usize) -> EngineRequest {
    let mut seq = 0u64;
    let blocks = names
        .iter()
        .map(|&n| {
            seq = seq.wrapping_mul(31).wrapping_add(n);
            FullBlock { seq, local: n }
        })
        .collect();
    EngineRequest {
        id,
        prompt_tokens: names.len() * bs + extra_tokens,
        prompt_blocks: blocks,
        max_tokens: out,
    }
}

/// Runs until idle; returns (passes, tokens per request id, all events).
fn drain(e: &mut Engine) -> (usize, Vec<(u64, usize, usize)>, Vec<RouterEvent>) {
    let mut passes = 0;
    let mut tokens = Vec::new();
    let mut events = Vec::new();
    while e.plan_step().is_some() {
        passes += 1;
        let r = e.finish_step();
        tokens.extend(
            r.tokens
                .iter()
                .map(|t| (t.request, t.generated, t.cached_tokens)),
        );
        events.extend(r.events.into_iter().map(|ev| RouterEvent::new(0, ev)));
        assert!(passes < 100_000, "engine never went idle");
    }
    (passes, tokens, events)
}

#[test]
fn second_request_hits_the_cached_prefix() {
    let mut e = Engine::new(cfg(64, 4, 1024), 0, 0);
    e.add_request(request(1, &[1, 2, 3], 4, 2, 2));
    drain(&mut e);
    e.add_request(request(2, &[1, 2, 3, 9], 4, 0, 1));
    let (_, tokens, _) = drain(&mut e);
    assert_eq!(
        tokens[0],
        (2, 1, 12),
        "three 4-token blocks served from cache"
    );
    assert!(e.metrics().kv_stats.gpu_prefix_cache_hit_rate > 0.3);
}

#[test]
fn fully_cached_prompt_still_computes_its_last_token() {
    let mut e = Engine::new(cfg(64, 4, 1024), 0, 0);
    e.add_request(request(1, &[1, 2], 4, 0, 1));
    drain(&mut e);
    e.add_request(request(2, &[1, 2], 4, 0, 1));
    let (_, tokens, _) = drain(&mut e);
    assert_eq!(tokens[0].2, 4, "one block recomputed to sample from");
}

#[test]
fn chunked_prefill_respects_the_token_budget() {
    let mut e = Engine::new(cfg(256, 4, 64), 0, 0);
    e.add_request(request(1, &(0..50).collect::<Vec<_>>(), 4, 0, 3));
    let mut passes_to_first = 0;
    loop {
        assert!(e.plan_step().is_some());
        passes_to_first += 1;
        if !e.finish_step().tokens.is_empty() {
            break;
        }
    }
    assert_eq!(passes_to_first, 200usize.div_ceil(64));
    let mut no_chunk = cfg(256, 4, 64);
    no_chunk.enable_chunked_prefill = false;
    let mut e = Engine::new(no_chunk, 0, 0);
    e.add_request(request(1, &(0..50).collect::<Vec<_>>(), 4, 0, 1));
    let (passes, tokens, _) = drain(&mut e);
    assert_eq!(
        (passes, tokens.len()),
        (1, 1),
        "alone in a pass, a long prompt runs whole"
    );
}

#[test]
fn preemption_frees_blocks_and_everything_finishes() {
    let mut e = Engine::new(cfg(12, 4, 1024), 0, 0);
    for id in 0..3 {
        e.add_request(request(id, &[id * 10 + 1, id * 10 + 2], 4, 0, 12));
    }
    let mut preempted = 0;
    let mut finished = HashSet::new();
    let mut passes = 0;
    while e.plan_step().is_some() {
        let r = e.finish_step();
        preempted += r.preempted;
        finished.extend(r.tokens.iter().filter(|t| t.finished).map(|t| t.request));
        passes += 1;
        assert!(passes < 10_000);
    }
    assert!(
        preempted > 0,
        "12 blocks cannot hold three 5-block requests"
    );
    assert_eq!(finished.len(), 3);
    assert_eq!(e.blocks().active_slots(), 0);
}

#[test]
fn events_have_increasing_ids_and_parent_chains() {
    let mut e = Engine::new(cfg(32, 4, 1024), 3, 1);
    e.add_request(request(1, &[1, 2, 3], 4, 1, 6));
    let (_, _, events) = drain(&mut e);
    let ids: Vec<u64> = events.iter().map(|e| e.event.event_id).collect();
    assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>());
    assert!(events.iter().all(|e| e.event.dp_rank == 1));
    let mut index = RadixIndex::new();
    for ev in &events {
        index
            .apply_event(ev)
            .expect("the engine's own chains are consistent");
    }
    // 3 prompt blocks + the block of (1 prompt token + 5 generated - 1 uncomputed... ) filled.
    assert_eq!(
        index.worker_size(WorkerKey::new(0, 1)),
        e.blocks().cached_blocks().count()
    );
    assert!(matches!(events[0].event.data, KvCacheEventData::Stored(_)));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Replaying an engine's events into the index always reproduces its cache.
    #[test]
    fn index_replay_reproduces_engine_cache(
        reqs in proptest::collection::vec((0u64..5, 1usize..6, 0usize..4, 1usize..8), 1..30),
        blocks in 8usize..40,
        batched in prop_oneof![Just(8usize), Just(64), Just(1024)],
    ) {
        let bs = 4;
        let mut e = Engine::new(cfg(blocks, bs, batched), 0, 0);
        let mut index = RadixIndex::new();
        for (i, (branch, len, extra, out)) in reqs.iter().enumerate() {
            // Prompts share prefixes: branch b's blocks are b*100 + 0..len.
            let names: Vec<u64> = (0..*len as u64).map(|k| branch * 100 + k).collect();
            e.add_request(request(i as u64, &names, bs, *extra, *out));
            // Run a few passes between arrivals, checking after each.
            for _ in 0..3 {
                if e.plan_step().is_none() { break; }
                for ev in e.finish_step().events {
                    prop_assert!(index.apply_event(&RouterEvent::new(0, ev)).is_ok());
                }
                let mut in_engine: Vec<u64> = e.blocks().cached_blocks().collect();
                in_engine.sort_unstable();
                let mut in_index: Vec<u64> = index.dump_events().iter().map(|ev| match &ev.event.data {
                    KvCacheEventData::Stored(s) => s.blocks[0].block_hash.0,
                    _ => unreachable!(),
                }).collect();
                in_index.sort_unstable();
                prop_assert_eq!(in_engine, in_index);
            }
        }
        let (_, _, events) = drain(&mut e);
        for ev in events {
            prop_assert!(index.apply_event(&ev).is_ok());
        }
        prop_assert_eq!(index.current_size(), e.blocks().cached_blocks().count());
        prop_assert_eq!(e.blocks().active_slots(), 0);
    }
}

fn small_trace() -> Vec<TraceRequest> {
    (0..300)
        .map(|i| TraceRequest {
            timestamp: (i * 37) as f64,
            input_length: 600 + (i % 7) * 400,
            output_length: 20 + i % 50,
            hash_ids: std::iter::once(0)
                .chain((0..(i % 5 + 1) as u64).map(|k| (i as u64 % 23) * 10 + k + 1))
                .collect(),
        })
        .collect()
}

#[test]
fn simulation_is_deterministic_and_kv_beats_round_robin_on_reuse() {
    let trace = small_trace();
    let cfg = SimConfig {
        workers: 4,
        data_parallel_size: 1,
        engine: EngineConfig {
            num_gpu_blocks: 256,
            block_size: 64,
            ..EngineConfig::default()
        },
        router: KvRouterConfig::default(),
        arrival_speedup: 1.0,
        seed: 7,
    };
    let reqs = sim::prepare(&trace, 64, 1.0);
    let modes = [
        SimMode::RoundRobin,
        SimMode::Random,
        SimMode::Kv,
        SimMode::KvApprox,
        SimMode::Oracle,
    ];
    let run = || {
        let reports: Vec<_> = modes
            .iter()
            .map(|m| sim::run(*m, &cfg, &reqs, &ProgressBar::hidden()))
            .collect();
        serde_json::to_string(&reports).unwrap()
    };
    let a = run();
    assert_eq!(a, run(), "same inputs, same JSON");
    let v: serde_json::Value = serde_json::from_str(&a).unwrap();
    let hit = |i: usize| v[i]["hit_rate"].as_f64().unwrap();
    assert!(hit(2) > hit(0), "kv {} vs round-robin {}", hit(2), hit(0));
    assert!(hit(4) >= hit(2) * 0.95, "the oracle bounds reuse");
    for i in 0..4 {
        assert_eq!(v[i]["requests"], 300);
        assert_eq!(v[i]["kv_event_errors"], 0);
        assert!(v[i]["ttft_p50_ms"].as_f64().unwrap() > 0.0);
    }
    assert!(v[4]["ttft_p50_ms"].is_null());
    // Two data-parallel ranks per worker: the router sees (worker, rank) pairs
    // and every rank's events land in the index cleanly.
    let dp = SimConfig {
        workers: 2,
        data_parallel_size: 2,
        ..cfg.clone()
    };
    let r = sim::run(SimMode::Kv, &dp, &reqs, &ProgressBar::hidden());
    assert_eq!(r.requests, 300);
    assert_eq!(r.kv_event_errors, 0);
    assert!(r.hit_rate > 0.0);
}
