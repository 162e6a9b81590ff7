//! Unit tests of the router handle: selection, the request guard, pins and exclusions.

use super::*;

fn meta() -> WorkerMetadata {
    WorkerMetadata {
        model_name: "m".into(),
        block_size: 4,
        total_kv_blocks: 1000,
        max_num_seqs: 16,
        max_num_batched_tokens: 1000,
        data_parallel_size: 1,
        enable_local_indexer: false,
    }
}

fn router(mode: RouterMode, cfg: KvRouterConfig) -> Arc<KvRouter> {
    let r = KvRouter::new(
        mode,
        cfg,
        4,
        LoadThresholds::default(),
        RouterMetrics::unregistered(),
    );
    for id in 1..=4 {
        r.add_worker(id, &meta());
    }
    r
}

#[test]
fn weight_zero_balances_distinct_load() {
    let r = router(RouterMode::Kv, KvRouterConfig::default());
    let tokens: Vec<u32> = (0..64).collect();
    let o = RouterConfigOverride {
        overlap_score_weight: Some(0.0),
        assume_kv_reuse: Some(false),
        ..Default::default()
    };
    let mut held = Vec::new();
    let mut seen = HashSet::new();
    for i in 0..4 {
        let q = RouteQuery {
            tokens: &tokens,
            config_override: Some(&o),
            ..Default::default()
        };
        let routing = r.select(&q).unwrap();
        seen.insert(routing.worker.worker_id);
        held.push(r.begin(format!("r{i}"), &routing, None));
    }
    assert_eq!(seen.len(), 4, "{:?}", r.state());
    drop(held);
    assert!(r.state().iter().all(|s| s.active_requests == 0));
}

#[test]
fn guard_tracks_prefill_output_and_free() {
    let cfg = KvRouterConfig {
        router_track_output_blocks: true,
        ..KvRouterConfig::default()
    };
    let r = router(RouterMode::Kv, cfg);
    let tokens: Vec<u32> = (0..10).collect();
    let routing = r
        .select(&RouteQuery {
            tokens: &tokens,
            ..Default::default()
        })
        .unwrap();
    let mut g = r.begin("a", &routing, None);
    let rank = |r: &KvRouter| {
        r.state()
            .into_iter()
            .find(|s| s.worker_id == routing.worker.worker_id)
            .unwrap()
    };
    assert_eq!(rank(&r).active_prefill_tokens, 10);
    assert_eq!(rank(&r).active_decode_blocks, 2);
    g.on_tokens(1);
    assert_eq!(rank(&r).active_prefill_tokens, 0);
    // 10 prompt + 3 output tokens cross into a 4th block.
    g.on_tokens(2);
    assert_eq!(rank(&r).active_decode_blocks, 3);
    drop(g);
    assert_eq!(rank(&r).active_requests, 0);
    assert_eq!(rank(&r).active_decode_blocks, 0);
}

#[test]
fn pinned_worker_exclusions_and_empty_prompt() {
    let r = router(RouterMode::RoundRobin, KvRouterConfig::default());
    let tokens = [1u32, 2, 3];
    let pinned = r
        .select(&RouteQuery {
            tokens: &tokens,
            worker_id: Some(3),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(pinned.worker.worker_id, 3);
    let all = [1, 2, 3, 4];
    assert_eq!(
        r.select(&RouteQuery {
            tokens: &tokens,
            exclude: &all,
            ..Default::default()
        }),
        Err(RouteError::NoWorkers)
    );
    assert!(matches!(
        r.select(&RouteQuery::default()),
        Err(RouteError::Invalid(_))
    ));
    r.remove_worker(2);
    let picks: HashSet<u64> = (0..6)
        .map(|_| {
            r.select(&RouteQuery {
                tokens: &tokens,
                ..Default::default()
            })
            .unwrap()
            .worker
            .worker_id
        })
        .collect();
    assert_eq!(picks, HashSet::from([1, 3, 4]));
}

/// Four workers each holding one 600-token prefill: saturated at θ = 0.5
/// (every rank above 0.5 × 1000 batched tokens).
fn saturated_router(
    policy: kvrouter_core::queue::QueuePolicy,
) -> (Arc<KvRouter>, Vec<ActiveRequest>) {
    let cfg = KvRouterConfig {
        router_queue_threshold: Some(0.5),
        router_queue_policy: policy,
        ..KvRouterConfig::default()
    };
    let r = router(RouterMode::Kv, cfg);
    let guards = (0..4u32)
        .map(|k| {
            let tokens: Vec<u32> = (k * 1000..k * 1000 + 600).collect();
            let q = RouteQuery {
                tokens: &tokens,
                ..Default::default()
            };
            r.begin(format!("s{k}"), &r.select(&q).unwrap(), None)
        })
        .collect::<Vec<_>>();
    assert!(r.state().iter().all(|s| s.active_prefill_tokens == 600));
    (r, guards)
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..400 {
        if done() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Holds requests of these prompt lengths (in arrival order) plus one whose
/// client leaves, then frees one rank and returns the release order.
async fn release_order(policy: kvrouter_core::queue::QueuePolicy) -> Vec<usize> {
    use std::time::Duration;
    let (r, mut guards) = saturated_router(policy);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (held, isl) in (1..).zip([300usize, 50, 200]) {
        let (r2, tx) = (r.clone(), tx.clone());
        tokio::spawn(async move {
            let turn = r2.turn(isl, Duration::ZERO).await;
            tx.send(isl).unwrap();
            drop(turn);
        });
        until("the request to be held", || {
            r.metrics().queue_depth.get() == held
        })
        .await;
    }
    let r2 = r.clone();
    let leaver = tokio::spawn(async move { r2.turn(1, Duration::ZERO).await });
    until("the leaver to be held", || {
        r.metrics().queue_depth.get() == 4
    })
    .await;
    leaver.abort();
    let _ = leaver.await;
    assert_eq!(
        r.metrics().queue_depth.get(),
        3,
        "a client that left is dropped"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        rx.try_recv().is_err(),
        "nothing is released while saturated"
    );
    // One rank's prefill finishes: it has room, the queue drains in order.
    guards[0].on_tokens(1);
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(
            tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(r.metrics().queue_depth.get(), 0);
    drop(guards);
    order
}

#[tokio::test]
async fn queue_holds_while_saturated_and_releases_fcfs() {
    use kvrouter_core::queue::QueuePolicy;
    assert_eq!(release_order(QueuePolicy::Fcfs).await, [300, 50, 200]);
}

#[tokio::test]
async fn queue_releases_the_shortest_prompt_first_under_wspt() {
    use kvrouter_core::queue::QueuePolicy;
    assert_eq!(release_order(QueuePolicy::Wspt).await, [50, 200, 300]);
}

#[tokio::test]
async fn queue_off_or_unsaturated_grants_at_once() {
    let (r, guards) = saturated_router(kvrouter_core::queue::QueuePolicy::Fcfs);
    drop(guards);
    let t = tokio::time::timeout(
        std::time::Duration::from_millis(100),
        r.turn(10, Default::default()),
    );
    assert!(t.await.is_ok(), "a rank has room: no wait");
    let off = router(RouterMode::Kv, KvRouterConfig::default());
    let _t = off.turn(10, Default::default()).await;
    assert_eq!(off.metrics().queue_depth.get(), 0);
}

/// The same cached, loaded worker: `kv` trades its cache for load, `kv-sticky`
/// keeps the family there while the load is within its bound.
#[test]
fn kv_sticky_keeps_a_cached_family_that_kv_moves() {
    use kvrouter_core::hash::{block_hashes, sequence_hashes};
    use kvrouter_core::protocols::{KvCacheEvent, KvCacheEventData, KvCacheStoreData};
    let prompt: Vec<u32> = (0..64).collect();
    let pick = |mode| {
        let r = router(mode, KvRouterConfig::default());
        let local = block_hashes(&prompt, 4);
        let data = KvCacheStoreData::root_chain(&local, &sequence_hashes(&local));
        r.apply_event(&RouterEvent::new(
            1,
            KvCacheEvent {
                event_id: 1,
                data: KvCacheEventData::Stored(data),
                dp_rank: 0,
            },
        ));
        // Two decoding requests of 40 tokens on worker 1.
        let mut held = Vec::new();
        for k in 0..2u32 {
            let other: Vec<u32> = (1000 * (k + 1)..1000 * (k + 1) + 40).collect();
            let q = RouteQuery {
                tokens: &other,
                worker_id: Some(1),
                ..Default::default()
            };
            let mut g = r.begin(format!("busy{k}"), &r.select(&q).unwrap(), None);
            g.on_tokens(1);
            held.push(g);
        }
        let q = RouteQuery {
            tokens: &prompt,
            ..Default::default()
        };
        r.select(&q).unwrap()
    };
    let kv = pick(RouterMode::Kv);
    assert_ne!(
        kv.worker.worker_id, 1,
        "kv moves the family off its loaded worker"
    );
    let sticky = pick(RouterMode::KvSticky);
    assert_eq!((sticky.worker.worker_id, sticky.overlap_blocks), (1, 16));
}
