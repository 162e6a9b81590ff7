//! Index tests: unit cases for every event rule, and property tests against a
//! naive model (`HashMap<WorkerKey, set of blocks>` plus a prefix walk).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::hash::{ExternalSequenceBlockHash as Ext, LocalBlockHash as Local, SequenceHash};
use crate::protocols::*;

fn stored(worker: u64, dp: u32, parent: Option<u64>, blocks: &[(u64, u64)]) -> RouterEvent {
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: 0,
            dp_rank: dp,
            data: KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent.map(Ext),
                blocks: blocks
                    .iter()
                    .map(|&(e, l)| KvCacheStoredBlockData {
                        block_hash: Ext(e),
                        tokens_hash: Local(l),
                        mm_extra_info: None,
                    })
                    .collect(),
            }),
        },
    )
}

fn removed(worker: u64, dp: u32, hashes: &[u64]) -> RouterEvent {
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: 0,
            dp_rank: dp,
            data: KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: hashes.iter().copied().map(Ext).collect(),
            }),
        },
    )
}

fn cleared(worker: u64) -> RouterEvent {
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: 0,
            dp_rank: 0,
            data: KvCacheEventData::Cleared,
        },
    )
}

fn q(locals: &[u64]) -> Vec<Local> {
    locals.iter().copied().map(Local).collect()
}

fn w(id: u64) -> WorkerKey {
    WorkerKey::new(id, 0)
}

#[test]
fn longest_prefix_per_worker() {
    let mut ix = RadixIndex::new();
    ix.apply_event(&stored(1, 0, None, &[(11, 1), (12, 2), (13, 3)]))
        .unwrap();
    ix.apply_event(&stored(2, 0, None, &[(21, 1), (22, 2)]))
        .unwrap();
    ix.apply_event(&stored(3, 0, None, &[(31, 9)])).unwrap();
    let m = ix.find_matches(&q(&[1, 2, 3, 4]));
    assert_eq!(m.sorted(), vec![(w(1), 3), (w(2), 2)]);
    assert_eq!(m.tree_size(w(1)), Some(3));
    assert_eq!(m.tree_size(w(2)), Some(2));
    assert!(
        ix.find_matches(&q(&[2, 3])).is_empty(),
        "edges are positional"
    );
    assert!(ix.find_matches(&[]).is_empty());
    ix.check_invariants().unwrap();
}

#[test]
fn parent_chains_and_errors_are_counted() {
    let mut ix = RadixIndex::new();
    ix.apply_event(&stored(1, 0, None, &[(11, 1)])).unwrap();
    ix.apply_event(&stored(1, 0, Some(11), &[(12, 2)])).unwrap();
    assert_eq!(
        ix.apply_event(&stored(1, 0, Some(99), &[(13, 3)])),
        Err(KvCacheEventError::ParentBlockNotFound)
    );
    assert_eq!(
        ix.apply_event(&stored(7, 0, Some(11), &[(13, 3)])),
        Err(KvCacheEventError::ParentBlockNotFound),
        "another worker's block is not a parent"
    );
    assert_eq!(
        ix.apply_event(&removed(1, 0, &[12, 404])),
        Err(KvCacheEventError::BlockNotFound)
    );
    assert_eq!(
        ix.find_matches(&q(&[1, 2])).sorted(),
        vec![(w(1), 1)],
        "known hash still removed"
    );
    let s = ix.stats();
    assert_eq!(s.get(EventKind::Stored, Ok(())), 2);
    assert_eq!(
        s.get(
            EventKind::Stored,
            Err(KvCacheEventError::ParentBlockNotFound)
        ),
        2
    );
    assert_eq!(
        s.get(EventKind::Removed, Err(KvCacheEventError::BlockNotFound)),
        1
    );
    assert_eq!(s.errors(), 3);
    ix.check_invariants().unwrap();
}

#[test]
fn self_referencing_chain_is_rejected_untouched() {
    let mut ix = RadixIndex::new();
    ix.apply_event(&stored(1, 0, None, &[(11, 1)])).unwrap();
    for bad in [
        stored(1, 0, Some(11), &[(12, 2), (11, 3)]),
        stored(1, 0, None, &[(20, 1), (21, 2), (20, 3)]),
        stored(1, 0, Some(11), &[(11, 5)]),
    ] {
        assert_eq!(
            ix.apply_event(&bad),
            Err(KvCacheEventError::InvalidBlockSequence)
        );
    }
    let long: Vec<(u64, u64)> = (0..100).map(|i| (1000 + i % 60, i)).collect();
    assert_eq!(
        ix.apply_event(&stored(1, 0, None, &long)),
        Err(KvCacheEventError::InvalidBlockSequence)
    );
    assert_eq!(ix.current_size(), 1);
    assert_eq!(ix.node_count(), 1);
    ix.check_invariants().unwrap();
}

#[test]
fn duplicate_store_is_idempotent_and_empty_events_are_noops() {
    let mut ix = RadixIndex::new();
    let ev = stored(1, 0, None, &[(11, 1), (12, 2)]);
    ix.apply_event(&ev).unwrap();
    ix.apply_event(&ev).unwrap();
    assert_eq!(ix.current_size(), 2);
    ix.apply_event(&stored(1, 0, None, &[])).unwrap();
    ix.apply_event(&removed(1, 0, &[])).unwrap();
    ix.apply_event(&cleared(42)).unwrap();
    assert_eq!(ix.workers(), vec![w(1)], "unknown workers are not created");
    ix.check_invariants().unwrap();
}

#[test]
fn clear_drops_all_ranks_and_remove_worker_forgets_them() {
    let mut ix = RadixIndex::new();
    ix.apply_event(&stored(1, 0, None, &[(11, 1)])).unwrap();
    ix.apply_event(&stored(1, 1, None, &[(11, 1), (12, 2)]))
        .unwrap();
    ix.apply_event(&stored(2, 0, None, &[(21, 1)])).unwrap();
    ix.apply_event(&cleared(1)).unwrap();
    assert_eq!(ix.find_matches(&q(&[1, 2])).sorted(), vec![(w(2), 1)]);
    assert_eq!(ix.workers().len(), 3, "cleared ranks stay known");
    ix.remove_worker(1);
    assert_eq!(ix.workers(), vec![w(2)]);
    ix.check_invariants().unwrap();
}

#[test]
fn removal_does_not_cascade_and_gap_stops_the_match() {
    let mut ix = RadixIndex::new();
    ix.apply_event(&stored(1, 0, None, &[(11, 1), (12, 2), (13, 3)]))
        .unwrap();
    ix.apply_event(&removed(1, 0, &[12])).unwrap();
    assert_eq!(ix.find_matches(&q(&[1, 2, 3])).sorted(), vec![(w(1), 1)]);
    assert_eq!(ix.worker_size(w(1)), 2);
    // Storing the middle block again reconnects the descendant the worker kept.
    ix.apply_event(&stored(1, 0, Some(11), &[(12, 2)])).unwrap();
    assert_eq!(ix.find_matches(&q(&[1, 2, 3])).sorted(), vec![(w(1), 3)]);
    ix.check_invariants().unwrap();
}

#[test]
fn memory_is_released_when_everything_is_removed() {
    let mut ix = RadixIndex::new();
    for wid in 0..8u64 {
        let chain: Vec<(u64, u64)> = (0..200).map(|i| (wid * 10_000 + i, i % 13)).collect();
        ix.apply_event(&stored(wid, 0, None, &chain)).unwrap();
    }
    assert!(ix.node_count() > 0);
    for wid in 0..4u64 {
        let hashes: Vec<u64> = (0..200).rev().map(|i| wid * 10_000 + i).collect();
        ix.apply_event(&removed(wid, 0, &hashes)).unwrap();
    }
    for wid in 4..6u64 {
        ix.apply_event(&cleared(wid)).unwrap();
    }
    for wid in 6..8u64 {
        ix.remove_worker(wid);
    }
    ix.check_invariants().unwrap();
    assert!(
        ix.is_empty(),
        "size {} nodes {}",
        ix.current_size(),
        ix.node_count()
    );
    assert!(ix.find_matches(&q(&[0, 1])).is_empty());
}

#[test]
fn dump_rebuilds_identical_answers() {
    let mut ix = RadixIndex::new();
    ix.apply_event(&stored(1, 0, None, &[(11, 1), (12, 2), (13, 3)]))
        .unwrap();
    ix.apply_event(&stored(2, 3, None, &[(11, 1), (22, 5)]))
        .unwrap();
    ix.apply_event(&stored(3, 0, Some(99), &[(31, 1)]))
        .unwrap_err();
    let dump = ix.dump_events();
    assert_eq!(dump.len(), 5);
    assert!(
        dump.iter()
            .enumerate()
            .all(|(i, e)| e.event.event_id == i as u64)
    );
    let back = RadixIndex::from_events(&dump);
    assert_eq!(back.stats().errors(), 0);
    for query in [&[1u64, 2, 3][..], &[1, 5], &[1], &[2]] {
        let a = ix.find_matches(&q(query));
        let b = back.find_matches(&q(query));
        assert_eq!(a.sorted(), b.sorted());
        for s in &a.scores {
            assert_eq!(b.tree_size(s.worker), Some(s.tree_size));
        }
    }
    // The dump survives JSON, the snapshot format.
    let json = serde_json::to_string(&dump).unwrap();
    let parsed: Vec<RouterEvent> = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed, dump);
}

#[test]
fn workers_with_different_engine_hashes_share_a_node() {
    let mut ix = RadixIndex::new();
    ix.apply_event(&stored(1, 0, None, &[(11, 1), (12, 2)]))
        .unwrap();
    // Worker 2's engine hashes the same prefix differently.
    ix.apply_event(&stored(2, 0, None, &[(21, 1), (22, 2)]))
        .unwrap();
    assert_eq!(ix.node_count(), 2);
    assert_eq!(
        ix.find_matches(&q(&[1, 2])).sorted(),
        vec![(w(1), 2), (w(2), 2)]
    );
    ix.apply_event(&stored(2, 0, Some(22), &[(23, 3)])).unwrap();
    assert_eq!(
        ix.apply_event(&removed(2, 0, &[12])),
        Err(KvCacheEventError::BlockNotFound),
        "worker 2 never stored worker 1's hash"
    );
    ix.apply_event(&removed(2, 0, &[23, 22])).unwrap();
    assert_eq!(
        ix.find_matches(&q(&[1, 2, 3])).sorted(),
        vec![(w(1), 2), (w(2), 1)]
    );
    // Storing a held position again under yet another hash is rejected.
    assert_eq!(
        ix.apply_event(&stored(2, 0, None, &[(99, 1)])),
        Err(KvCacheEventError::InvalidBlockSequence)
    );
    ix.check_invariants().unwrap();
    ix.remove_worker(2);
    ix.remove_worker(1);
    assert!(ix.is_empty());
}

#[test]
fn many_workers_on_one_node() {
    let mut ix = RadixIndex::new();
    for wid in 0..300u64 {
        ix.apply_event(&stored(wid, 0, None, &[(7, 1), (wid + 100, 2 + wid % 3)]))
            .unwrap();
    }
    let m = ix.find_matches(&q(&[1, 3]));
    assert_eq!(m.scores.len(), 300);
    assert_eq!(m.scores.iter().filter(|s| s.blocks == 2).count(), 100);
    ix.check_invariants().unwrap();
}

// --- approximate index ---

fn approx_route(ix: &mut ApproxIndex, worker: u64, locals: &[u64], now: Instant) {
    let local = q(locals);
    let seq: Vec<SequenceHash> = crate::hash::sequence_hashes(&local);
    ix.process_routing_decision(w(worker), &local, &seq, now);
}

#[test]
fn approx_ttl_expiry_and_refresh() {
    let t0 = Instant::now();
    let ttl = Duration::from_secs(120);
    let mut ix = ApproxIndex::new(PruneConfig::default());
    approx_route(&mut ix, 1, &[1, 2, 3], t0);
    approx_route(&mut ix, 2, &[1, 2], t0 + Duration::from_secs(60));
    assert_eq!(ix.expire(t0 + ttl - Duration::from_millis(1)), 0);
    assert_eq!(
        ix.find_matches(&q(&[1, 2, 3])).sorted(),
        vec![(w(1), 3), (w(2), 2)]
    );
    // Worker 1 refreshes its first block only.
    approx_route(&mut ix, 1, &[1], t0 + Duration::from_secs(100));
    assert_eq!(ix.expire(t0 + ttl), 2);
    assert_eq!(
        ix.find_matches(&q(&[1, 2, 3])).sorted(),
        vec![(w(1), 1), (w(2), 2)]
    );
    assert_eq!(ix.expire(t0 + Duration::from_secs(1000)), 3);
    assert_eq!(ix.current_size(), 0);
    assert!(ix.tree().is_empty());
}

#[test]
fn approx_prunes_earliest_then_deepest() {
    let t0 = Instant::now();
    let cfg = PruneConfig {
        ttl: Duration::from_secs(120),
        max_tree_size: 10,
        prune_target_ratio: 0.5,
    };
    assert_eq!(
        PruneConfig::default(),
        PruneConfig {
            ttl: Duration::from_secs(120),
            max_tree_size: 1 << 20,
            prune_target_ratio: 0.8
        }
    );
    let mut ix = ApproxIndex::new(cfg);
    approx_route(&mut ix, 1, &[1, 2, 3, 4], t0);
    approx_route(&mut ix, 2, &[1, 2, 3, 4], t0 + Duration::from_secs(1));
    approx_route(&mut ix, 3, &[9, 8], t0 + Duration::from_secs(2));
    assert_eq!(ix.current_size(), 10);
    approx_route(&mut ix, 3, &[9, 8, 7], t0 + Duration::from_secs(3));
    // 11 > 10: prune to 5. Worker 1 (earliest) goes entirely, deepest first, then worker 2's two deepest.
    assert_eq!(ix.current_size(), 5);
    let m = ix.find_matches(&q(&[1, 2, 3, 4]));
    assert_eq!(m.sorted(), vec![(w(2), 2)]);
    assert_eq!(ix.find_matches(&q(&[9, 8, 7])).sorted(), vec![(w(3), 3)]);
    ix.tree().check_invariants().unwrap();
}

// --- property tests against a naive model ---

/// A universe of 48 prefixes: prefix k extends `parent[k]` (or starts at the root).
/// Engine hash = 1000 + k (unique); local hash small and reused across branches.
#[derive(Debug, Clone)]
struct Universe {
    parent: Vec<Option<usize>>,
    local: Vec<u64>,
}

impl Universe {
    fn new(seed_parents: &[usize]) -> Self {
        let n = seed_parents.len();
        let mut parent = Vec::with_capacity(n);
        let mut local = Vec::with_capacity(n);
        let mut used: HashMap<Option<usize>, BTreeSet<u64>> = HashMap::new();
        for (k, &sp) in seed_parents.iter().enumerate() {
            let p = if k == 0 || sp % 4 == 0 {
                None
            } else {
                Some(sp % k)
            };
            let siblings = used.entry(p).or_default();
            let mut l = (k as u64 * 7) % 5;
            while siblings.contains(&l) {
                l += 1;
            }
            siblings.insert(l);
            parent.push(p);
            local.push(l);
        }
        Self { parent, local }
    }

    fn path(&self, k: usize) -> Vec<usize> {
        let mut v = vec![k];
        let mut at = k;
        while let Some(p) = self.parent[at] {
            v.push(p);
            at = p;
        }
        v.reverse();
        v
    }
}

#[derive(Debug, Clone)]
enum Op {
    Store { worker: u8, node: usize, len: usize },
    Remove { worker: u8, nodes: Vec<usize> },
    Clear { worker_id: u8 },
    RemoveWorker { worker_id: u8 },
    Query { node: usize, extra: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..6, 0usize..48, 1usize..6).prop_map(|(worker, node, len)| Op::Store { worker, node, len }),
        3 => (0u8..6, proptest::collection::vec(0usize..48, 1..5)).prop_map(|(worker, nodes)| Op::Remove { worker, nodes }),
        1 => (0u8..3).prop_map(|worker_id| Op::Clear { worker_id }),
        1 => (0u8..3).prop_map(|worker_id| Op::RemoveWorker { worker_id }),
        5 => (0usize..48, any::<bool>()).prop_map(|(node, extra)| Op::Query { node, extra }),
    ]
}

/// Worker byte → key: three worker ids with two dp ranks each.
fn key(worker: u8) -> WorkerKey {
    WorkerKey::new((worker / 2) as u64, (worker % 2) as u32)
}

type Model = HashMap<WorkerKey, BTreeSet<usize>>;

fn model_matches(model: &Model, path: &[usize]) -> Vec<(WorkerKey, u32)> {
    let mut out: Vec<(WorkerKey, u32)> = model
        .iter()
        .map(|(k, set)| {
            (
                *k,
                path.iter().take_while(|n| set.contains(n)).count() as u32,
            )
        })
        .filter(|(_, d)| *d > 0)
        .collect();
    out.sort_unstable();
    out
}

/// Applies `op` to the index under test (through `apply`) and the model; returns
/// the expected result of the event, or the query to compare.
fn step(
    u: &Universe,
    model: &mut Model,
    op: &Op,
    mut apply: impl FnMut(&RouterEvent) -> Option<Result<(), KvCacheEventError>>,
    mut remove_worker: impl FnMut(u64),
) -> Option<Vec<Local>> {
    match op {
        Op::Store { worker, node, len } => {
            let k = key(*worker);
            let path = u.path(*node);
            let chain = &path[path.len().saturating_sub(*len)..];
            let parent = u.parent[chain[0]];
            let ok = parent.is_none_or(|p| model.get(&k).is_some_and(|s| s.contains(&p)));
            let blocks: Vec<(u64, u64)> = chain
                .iter()
                .map(|&n| (1000 + n as u64, u.local[n]))
                .collect();
            let got = apply(&stored(
                k.worker_id,
                k.dp_rank,
                parent.map(|p| 1000 + p as u64),
                &blocks,
            ));
            if ok {
                model.entry(k).or_default().extend(chain.iter().copied());
            }
            if let Some(got) = got {
                assert_eq!(got.is_ok(), ok, "store {op:?}");
            }
            None
        }
        Op::Remove { worker, nodes } => {
            let k = key(*worker);
            let held = model.entry(k).or_default();
            let mut ok = true;
            for n in nodes {
                ok &= held.remove(n);
            }
            let hashes: Vec<u64> = nodes.iter().map(|&n| 1000 + n as u64).collect();
            if let Some(got) = apply(&removed(k.worker_id, k.dp_rank, &hashes)) {
                assert_eq!(got.is_ok(), ok, "remove {op:?}");
            }
            None
        }
        Op::Clear { worker_id } => {
            for (k, set) in model.iter_mut() {
                if k.worker_id == *worker_id as u64 {
                    set.clear();
                }
            }
            apply(&cleared(*worker_id as u64));
            None
        }
        Op::RemoveWorker { worker_id } => {
            model.retain(|k, _| k.worker_id != *worker_id as u64);
            remove_worker(*worker_id as u64);
            None
        }
        Op::Query { node, extra } => {
            let mut locals: Vec<Local> = u.path(*node).iter().map(|&n| Local(u.local[n])).collect();
            if *extra {
                locals.push(Local(77));
            }
            Some(locals)
        }
    }
}

/// The index's content as sorted `(worker, parent hash, block hash, local hash)`.
fn canonical(ix: &RadixIndex) -> Vec<(WorkerKey, Option<u64>, u64, u64)> {
    let mut v: Vec<_> = ix
        .dump_events()
        .into_iter()
        .map(|e| {
            let worker = e.worker_key();
            let KvCacheEventData::Stored(s) = e.event.data else {
                unreachable!("dumps hold stored events only")
            };
            let b = &s.blocks[0];
            (
                worker,
                s.parent_hash.map(|p| p.0),
                b.block_hash.0,
                b.tokens_hash.0,
            )
        })
        .collect();
    v.sort_unstable();
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn radix_matches_naive_model(
        parents in proptest::collection::vec(0usize..1000, 48),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let u = Universe::new(&parents);
        let mut model = Model::new();
        let mut ix = RadixIndex::new();
        for op in &ops {
            let query = {
                let ix_cell = std::cell::RefCell::new(&mut ix);
                step(&u, &mut model, op,
                    |ev| Some(ix_cell.borrow_mut().apply_event(ev)),
                    |id| ix_cell.borrow_mut().remove_worker(id))
            };
            if let Some(locals) = query {
                let path: Vec<usize> = match op { Op::Query { node, .. } => u.path(*node), _ => unreachable!() };
                prop_assert_eq!(ix.find_matches(&locals).sorted(), model_matches(&model, &path));
                for s in &ix.find_matches(&locals).scores {
                    prop_assert_eq!(s.tree_size, model[&s.worker].len());
                }
            }
            prop_assert_eq!(ix.current_size(), model.values().map(BTreeSet::len).sum::<usize>());
        }
        ix.check_invariants().map_err(TestCaseError::fail)?;
        // Dump → rebuild answers every root path the same way.
        let back = RadixIndex::from_events(&ix.dump_events());
        prop_assert_eq!(back.stats().errors(), 0);
        for k in 0..u.parent.len() {
            let locals: Vec<Local> = u.path(k).iter().map(|&n| Local(u.local[n])).collect();
            prop_assert_eq!(ix.find_matches(&locals).sorted(), back.find_matches(&locals).sorted());
        }
        // Removing every worker leaves nothing behind.
        for id in 0..3 { ix.remove_worker(id); }
        prop_assert!(ix.is_empty());
    }

    #[test]
    fn threaded_index_equals_single_threaded(
        parents in proptest::collection::vec(0usize..1000, 48),
        ops in proptest::collection::vec(op(), 1..80),
        threads in 1usize..4,
    ) {
        let u = Universe::new(&parents);
        let mut model = Model::new();
        let mut single = RadixIndex::new();
        let mut threaded = ThreadedIndex::new(threads);
        for op in &ops {
            let query = {
                let s = std::cell::RefCell::new((&mut single, &mut threaded));
                step(&u, &mut model, op,
                    |ev| { let (a, b) = &mut *s.borrow_mut(); b.submit(ev.clone()); Some(a.apply_event(ev)) },
                    |id| { let (a, b) = &mut *s.borrow_mut(); b.flush(); a.remove_worker(id); b.index().remove_worker(id); })
            };
            if let Some(locals) = query {
                threaded.flush();
                prop_assert_eq!(threaded.index().find_matches(&locals).sorted(), single.find_matches(&locals).sorted());
            }
        }
        threaded.flush();
        prop_assert_eq!(threaded.index().current_size(), single.current_size());
        prop_assert_eq!(threaded.index().stats(), *single.stats());
    }

    #[test]
    fn arbitrary_events_never_corrupt(
        events in proptest::collection::vec(
            (0u64..4, 0u32..2, 0u8..4, proptest::option::of(0u64..12),
             proptest::collection::vec((0u64..12, 0u64..4), 0..6)),
            1..150),
    ) {
        let mut ix = RadixIndex::new();
        for (wid, dp, kind, parent, blocks) in &events {
            let ev = match kind {
                0 | 1 => stored(*wid, *dp, *parent, blocks),
                2 => removed(*wid, *dp, &blocks.iter().map(|b| b.0).collect::<Vec<_>>()),
                _ => cleared(*wid),
            };
            let before = canonical(&ix);
            let result = ix.apply_event(&ev);
            ix.check_invariants().map_err(TestCaseError::fail)?;
            if kind < &2 && result.is_err() {
                prop_assert_eq!(canonical(&ix), before, "a rejected store changed the index");
            }
            let _ = ix.find_matches(&q(&[0, 1, 2, 3]));
        }
        prop_assert_eq!(ix.stats().total(), events.len() as u64);
        for wid in 0..4 { ix.remove_worker(wid); }
        ix.check_invariants().map_err(TestCaseError::fail)?;
        prop_assert!(ix.is_empty());
    }
}
