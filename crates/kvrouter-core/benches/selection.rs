//! Criterion benchmarks of the scheduling core: selection over 8 / 128 / 1024
//! workers, a full routing decision (potential load + selection + sequence
//! update) and add/free of a 512-block request.
//!
//! Run: `cargo bench -p kvrouter-core --bench selection`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use kvrouter_core::WorkerKey;
use kvrouter_core::selection::{Candidate, RouteRequest, select_kv};
use kvrouter_core::sequences::{NewRequest, SequenceTracker};
use rand::SeedableRng;
use rand::rngs::StdRng;

const BS: usize = 16;
const PROMPT_BLOCKS: u64 = 32;

fn request() -> RouteRequest {
    RouteRequest {
        isl_tokens: PROMPT_BLOCKS as usize * BS,
        block_size: BS,
        overlap_score_weight: 1.0,
        temperature: 0.0,
    }
}

/// A tracker with `n` ranks, each running four 32-block requests.
fn loaded_tracker(n: u64) -> SequenceTracker {
    let t0 = Instant::now();
    let mut t = SequenceTracker::new(BS);
    for w in 0..n {
        for r in 0..4u64 {
            let hashes: Vec<u64> = (0..PROMPT_BLOCKS)
                .map(|b| (w << 32) | (r << 16) | b)
                .collect();
            let id = format!("w{w}r{r}");
            t.add_request(
                WorkerKey::new(w, 0),
                NewRequest {
                    id: &id,
                    seq_hashes: Some(&hashes),
                    isl: PROMPT_BLOCKS as usize * BS,
                    overlap: 0,
                    expected_output_tokens: None,
                },
                t0,
            )
            .expect("fresh id");
        }
    }
    t
}

fn selection(c: &mut Criterion) {
    let mut g = c.benchmark_group("select_kv");
    for n in [8u64, 128, 1024] {
        let cands: Vec<Candidate> = (0..n)
            .map(|w| Candidate {
                worker: WorkerKey::new(w, 0),
                overlap_blocks: (w % 7) as u32,
                tree_size: (w * 31 % 1000) as usize,
                prefill_tokens: ((w * 7919) % 4096) as usize,
                decode_blocks: ((w * 104729) % 512) as usize,
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(1);
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| black_box(select_kv(&request(), black_box(&cands), &mut rng)))
        });
    }
    g.finish();
}

fn routing_decision(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_decision");
    for n in [8u64, 128, 1024] {
        let mut t = loaded_tracker(n);
        let mut rng = StdRng::seed_from_u64(2);
        // The new prompt shares its first 8 blocks with worker 3's first request.
        let hashes: Vec<u64> = (0..PROMPT_BLOCKS)
            .map(|b| if b < 8 { (3 << 32) | b } else { (1 << 60) | b })
            .collect();
        let t0 = Instant::now();
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let overlap = |w: WorkerKey| if w.worker_id == 3 { 8 } else { 0 };
                    let loads =
                        t.potential_load(PROMPT_BLOCKS as usize * BS, Some(&hashes), overlap);
                    let cands: Vec<Candidate> = loads
                        .iter()
                        .map(|l| Candidate {
                            worker: l.worker,
                            overlap_blocks: overlap(l.worker),
                            tree_size: 0,
                            prefill_tokens: l.prefill_tokens,
                            decode_blocks: l.decode_blocks,
                        })
                        .collect();
                    let d = select_kv(&request(), &cands, &mut rng).expect("workers");
                    t.add_request(
                        d.worker,
                        NewRequest {
                            id: "bench",
                            seq_hashes: Some(&hashes),
                            isl: PROMPT_BLOCKS as usize * BS,
                            overlap: d.overlap_blocks,
                            expected_output_tokens: None,
                        },
                        t0,
                    )
                    .expect("freed each round");
                    spent += start.elapsed();
                    t.free("bench").expect("tracked");
                }
                spent
            })
        });
    }
    g.finish();
}

fn add_free(c: &mut Criterion) {
    let mut t = loaded_tracker(16);
    let hashes: Vec<u64> = (0..512u64).map(|b| (7 << 48) | b).collect();
    let t0 = Instant::now();
    c.bench_function("sequences/add_free_512_blocks", |b| {
        b.iter(|| {
            t.add_request(
                WorkerKey::new(5, 0),
                NewRequest {
                    id: "big",
                    seq_hashes: Some(black_box(&hashes)),
                    isl: 512 * BS,
                    overlap: 0,
                    expected_output_tokens: None,
                },
                t0,
            )
            .expect("fresh");
            t.free("big").expect("tracked");
        })
    });
}

criterion_group!(benches, selection, routing_decision, add_free);
criterion_main!(benches);
