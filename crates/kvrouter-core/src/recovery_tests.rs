//! Recovery tests: a dump rebuilds exactly what the live index answers, the
//! log answers ranges it still has, and the follower's gap handling ends with
//! the events in order whatever the answer.

use proptest::prelude::*;

use super::*;
use crate::hash::{ExternalSequenceBlockHash as Ext, LocalBlockHash as Local};
use crate::index::RadixIndex;
use crate::protocols::KvCacheRemoveData;

fn event(id: u64, data: KvCacheEventData) -> KvCacheEvent {
    KvCacheEvent {
        event_id: id,
        data,
        dp_rank: 0,
    }
}

fn stored(id: u64, parent: Option<u64>, blocks: &[u64]) -> KvCacheEvent {
    event(
        id,
        KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: parent.map(Ext),
            blocks: blocks
                .iter()
                .map(|&h| KvCacheStoredBlockData {
                    block_hash: Ext(h),
                    // The local hash is derived from the engine hash: distinct blocks stay distinct.
                    tokens_hash: Local(h.wrapping_mul(31) ^ 7),
                    mm_extra_info: None,
                })
                .collect(),
        }),
    )
}

fn removed(id: u64, hashes: &[u64]) -> KvCacheEvent {
    event(
        id,
        KvCacheEventData::Removed(KvCacheRemoveData {
            block_hashes: hashes.iter().map(|&h| Ext(h)).collect(),
        }),
    )
}

/// Every prefix of every chain ever stored, as local hashes.
fn probes(chains: &[Vec<u64>]) -> Vec<Vec<Local>> {
    chains
        .iter()
        .map(|c| c.iter().map(|&h| Local(h.wrapping_mul(31) ^ 7)).collect())
        .collect()
}

/// A random history of one rank: chains of blocks under earlier blocks,
/// removals and an occasional clear. Returns the events and the chains.
fn history(ops: &[(u8, u8, u8)]) -> (Vec<KvCacheEvent>, Vec<Vec<u64>>) {
    let mut events = Vec::new();
    let mut chains: Vec<Vec<u64>> = Vec::new();
    let mut next = 1u64;
    for (i, &(kind, pick, len)) in ops.iter().enumerate() {
        let id = i as u64;
        match kind % 8 {
            0..=4 => {
                // Extend a prefix of an earlier chain, or start a new root chain.
                let base: Vec<u64> = match chains.get(pick as usize % (chains.len() + 1)) {
                    Some(c) => c[..=(pick as usize % c.len())].to_vec(),
                    None => Vec::new(),
                };
                let new: Vec<u64> = (0..1 + len % 4)
                    .map(|_| {
                        next += 1;
                        next
                    })
                    .collect();
                events.push(stored(id, base.last().copied(), &new));
                chains.push([base, new].concat());
            }
            5 | 6 => {
                let c = chains.get(pick as usize % chains.len().max(1));
                let h = c.map_or(0, |c| c[len as usize % c.len()]);
                events.push(removed(id, &[h]));
            }
            _ => events.push(event(id, KvCacheEventData::Cleared)),
        }
    }
    (events, chains)
}

/// What a lookup answers that routing uses: each rank's overlap in blocks.
/// (`tree_size` may differ: blocks whose parent was evicted stay counted in a
/// live index, but no lookup reaches them and a dump leaves them out.)
fn overlaps(idx: &RadixIndex, p: &[Local]) -> Vec<(WorkerKey, u32)> {
    idx.find_matches(p)
        .scores
        .iter()
        .map(|s| (s.worker, s.blocks))
        .collect()
}

fn index_of(events: impl IntoIterator<Item = RouterEvent>) -> RadixIndex {
    let mut idx = RadixIndex::new();
    for ev in events {
        let _ = idx.apply_event(&ev);
    }
    idx
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn a_dump_answers_every_lookup_as_the_live_index_does(
        ops in prop::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 1..120)
    ) {
        let (events, chains) = history(&ops);
        let mut log = LocalLog::new(5, 0);
        for e in &events {
            log.record(e);
        }
        let live = index_of(events.iter().map(|e| RouterEvent::new(5, e.clone())));
        let KvQueryReply::Dump { last_event_id, events: dump } = log.answer(None) else {
            panic!("no start asks for a dump");
        };
        prop_assert_eq!(last_event_id, events.last().map(|e| e.event_id));
        let fresh = index_of(dump);
        for p in probes(&chains) {
            prop_assert_eq!(overlaps(&live, &p), overlaps(&fresh, &p));
        }
    }

    #[test]
    fn a_gap_repaired_from_the_log_ends_like_no_gap(
        ops in prop::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 2..200),
        cut in any::<prop::sample::Index>(),
        lost in 1usize..40,
        dump in any::<bool>(),
    ) {
        let (events, chains) = history(&ops);
        let mut log = LocalLog::new(5, 0);
        let mut follower = Follower::default();
        for step in follower.add_worker(5, 1, true) {
            let asks_dump = matches!(step, Step::Recover { start: None, .. });
            prop_assert!(asks_dump);
        }
        // The worker was empty when discovered.
        let first = follower.finish(WorkerKey::new(5, 0), Some(log.answer(None)));
        prop_assert!(first.apply.is_empty());
        let mut idx = RadixIndex::new();
        // At least one event follows the lost ones: a gap shows at the next event.
        let cut = cut.index(events.len() - 1);
        let lost = lost.min(events.len() - 1 - cut);
        let mut pending = None;
        for (i, e) in events.iter().enumerate() {
            log.record(e);
            if i >= cut && i < cut + lost {
                continue; // lost in transit
            }
            match follower.on_event(RouterEvent::new(5, e.clone())) {
                Step::Apply(ev) => { let _ = idx.apply_event(&ev); }
                Step::Recover { key, start, missing } => {
                    prop_assert_eq!(start, Some(cut as u64));
                    prop_assert_eq!(missing as usize, lost);
                    pending = Some(key);
                }
                Step::Held => {}
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
        if let Some(key) = pending {
            // The answer arrives after everything was published.
            let reply = if dump { log.answer(None) } else { log.answer(Some(cut as u64)) };
            let r = follower.finish(key, Some(reply));
            prop_assert!(r.again.is_none());
            if r.reset {
                idx.remove_worker_rank(key);
            }
            for ev in r.apply {
                let _ = idx.apply_event(&ev);
            }
        }
        let truth = index_of(events.iter().map(|e| RouterEvent::new(5, e.clone())));
        for p in probes(&chains) {
            prop_assert_eq!(overlaps(&truth, &p), overlaps(&idx, &p));
        }
    }
}

#[test]
fn the_log_answers_ranges_it_still_has_and_dumps_otherwise() {
    let mut log = LocalLog::new(1, 0);
    for i in 0..(LOG_EVENTS as u64 + 10) {
        log.record(&stored(i, None, &[i + 1]));
    }
    match log.answer(Some(20)) {
        KvQueryReply::Events { events } => {
            assert_eq!(events.first().unwrap().event.event_id, 20);
            assert_eq!(events.len(), LOG_EVENTS - 10);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(log.answer(Some(3)), KvQueryReply::Dump { .. }));
    assert_eq!(log.len(), LOG_EVENTS + 10);
}

#[test]
fn held_events_wait_for_the_answer_and_the_rest_follows_the_rules() {
    let mut f = Follower::default();
    let key = WorkerKey::new(9, 0);
    let ev = |id| RouterEvent::new(9, removed(id, &[id]));
    // Unknown to the follower (no discovery): applied as it comes.
    assert_eq!(f.on_event(ev(0)), Step::Apply(ev(0)));
    f.add_worker(9, 1, true);
    assert!(f.recovering(key));
    assert_eq!(f.on_event(ev(4)), Step::Held);
    let r = f.finish(
        key,
        Some(KvQueryReply::Dump {
            last_event_id: Some(3),
            events: vec![],
        }),
    );
    assert!(r.reset);
    assert_eq!(r.apply, vec![ev(4)]);
    assert_eq!(f.on_event(ev(5)), Step::Apply(ev(5)));
    assert_eq!(f.on_event(ev(2)), Step::Stale);
    assert_eq!(
        f.on_event(ev(8)),
        Step::Recover {
            key,
            start: Some(6),
            missing: 2
        }
    );
    assert_eq!(f.on_event(ev(9)), Step::Held);
    // An answer that skips what was asked starts over from a dump.
    let r = f.finish(
        key,
        Some(KvQueryReply::Events {
            events: vec![ev(7)],
        }),
    );
    assert!(matches!(r.again, Some(Step::Recover { start: None, .. })));
    // A worker that cannot answer: the held events are applied anyway.
    let r = f.finish(key, None);
    assert_eq!(r.apply, vec![ev(8), ev(9)]);
    // A worker that cannot be asked: gaps are applied and reported.
    f.add_worker(3, 1, false);
    assert_eq!(
        f.on_event(RouterEvent::new(3, removed(0, &[1]))),
        Step::Apply(RouterEvent::new(3, removed(0, &[1])))
    );
    assert_eq!(
        f.on_event(RouterEvent::new(3, removed(5, &[1]))),
        Step::Unrepairable(RouterEvent::new(3, removed(5, &[1])), 4)
    );
}
