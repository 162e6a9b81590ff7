//! Durable KV events over a real `nats-server -js`: workers publish to the
//! stream, a router snapshots and purges past a low threshold, and a router
//! started afterwards (from the snapshot plus the rest of the stream) answers
//! `find_matches` exactly as the first one did.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvrouter_core::llm::{PreprocessedRequest, StopConditions};
use kvrouter_core::{KvRouterConfig, WorkerKey};
use kvrouter_mocker::engine::EngineConfig;
use kvrouter_mocker::service::{self, WorkerConfig};
use kvrouter_router::WorkerPool;
use kvrouter_runtime::discovery::MemDiscovery;
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::events::{NatsEvents, open_kv_stream};
use kvrouter_runtime::node::{Node, Plane};
use kvrouter_runtime::testing::NatsServer;

mod common;

async fn router(node: &Node, endpoint: &EndpointId, reset: bool) -> Arc<WorkerPool> {
    let cfg = KvRouterConfig {
        durable_kv_events: true,
        router_snapshot_threshold: Some(20),
        router_reset_states: reset,
        ..KvRouterConfig::default()
    };
    common::pool(node, endpoint, cfg, 2).await
}

fn prompt(conversation: u32, turn: u32) -> Vec<u32> {
    // Turns of one conversation share their history: prefixes grow turn by turn.
    (0..(turn + 1) * 200)
        .map(|i| 3 + (conversation * 7919 + i * 31) % 3900)
        .collect()
}

type Answers = Vec<Vec<(WorkerKey, u32)>>;

fn answers(pool: &WorkerPool, prompts: &[Vec<u32>]) -> Answers {
    prompts
        .iter()
        .map(|p| pool.router().find_matches(p).sorted())
        .collect()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_the_index_from_snapshot_and_stream() {
    let nats = NatsServer::start().expect("nats-server (make test installs it)");
    let events = NatsEvents::connect(&nats.url()).await.unwrap();
    let node = Node::new(
        Arc::new(MemDiscovery::new()),
        Arc::new(events.clone()),
        Plane::Tcp,
        Some(events.client()),
        "127.0.0.1",
    );
    let endpoint: EndpointId = "durable.backend.generate".parse().unwrap();
    let cfg = WorkerConfig {
        engine: EngineConfig {
            speedup_ratio: 100.0,
            ..EngineConfig::default()
        },
        durable_kv_events: true,
        ..WorkerConfig::default()
    };
    let _w1 = service::start(&node, &endpoint, 1, cfg.clone())
        .await
        .unwrap();
    let _w2 = service::start(&node, &endpoint, 2, cfg).await.unwrap();
    let first = router(&node, &endpoint, false).await;
    // Route a small multi-turn workload.
    let mut prompts = Vec::new();
    for turn in 0..3 {
        for conversation in 0..8 {
            let tokens = prompt(conversation, turn);
            let req = PreprocessedRequest {
                token_ids: tokens.clone(),
                stop_conditions: StopConditions {
                    max_tokens: Some(2),
                    ..Default::default()
                },
                ..Default::default()
            };
            let id = format!("c{conversation}t{turn}");
            let mut s = first.generate(&req, &id).await.unwrap();
            while let Some(out) = s.next().await {
                out.unwrap();
            }
            prompts.push(tokens);
        }
    }
    let stream = open_kv_stream(events.client(), &endpoint).await.unwrap();
    // Past the threshold the first router snapshots and purges what it acknowledged.
    until("a snapshot", || {
        first.router().metrics().snapshots.get() >= 1
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let left = loop {
        let n = stream.message_count().await.unwrap();
        if n <= 20 || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(left <= 20, "stream not purged: {left} messages left");
    let before = answers(&first, &prompts);
    assert!(
        before.iter().filter(|a| !a.is_empty()).count() >= 20,
        "the workload was indexed: {before:?}"
    );
    drop(first);
    // A new router: snapshot plus the rest of the stream, nothing lost.
    let second = router(&node, &endpoint, false).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let after = answers(&second, &prompts);
        if after == before || Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(after, before, "answers differ after restart");
    drop(second);
    // Forged events in the stream, for 100 workers discovery never announced
    // (two each): a router replaying the stream keeps none of them; past the
    // 64 unknown workers it holds events for, they are rejected at once.
    let phantoms = 424_200u64..424_300;
    let flood = 2 * (phantoms.end - phantoms.start);
    for i in 0..flood {
        let ev = kvrouter_core::RouterEvent::new(
            phantoms.start + i / 2,
            kvrouter_core::protocols::KvCacheEvent {
                event_id: i,
                data: kvrouter_core::protocols::KvCacheEventData::Stored(
                    kvrouter_core::protocols::KvCacheStoreData {
                        parent_hash: None,
                        blocks: vec![kvrouter_core::protocols::KvCacheStoredBlockData {
                            block_hash: kvrouter_core::ExternalSequenceBlockHash(9_000_000 + i),
                            tokens_hash: kvrouter_core::LocalBlockHash(8_000_000 + i),
                            mm_extra_info: None,
                        }],
                    },
                ),
                dp_rank: 0,
            },
        );
        kvrouter_router::durable::publish(&stream, &ev)
            .await
            .unwrap();
    }
    let gated = router(&node, &endpoint, false).await;
    until("the forged backlog replayed", || {
        gated
            .router()
            .metrics()
            .events_rejected
            .with_label_values(&["unknown_worker"])
            .get()
            >= flood - 2 * kvrouter_router::admit::HOLD_WORKERS as u64
    })
    .await;
    assert!(
        !gated
            .router()
            .dump_events()
            .iter()
            .any(|e| phantoms.contains(&e.worker_id)),
        "forged blocks reached the index"
    );
    assert_eq!(
        answers(&gated, &prompts),
        before,
        "the real workers' blocks are all there"
    );
    drop(gated);
    // --router-reset-states: stream purged, snapshot deleted, index empty.
    let third = router(&node, &endpoint, true).await;
    assert_eq!(stream.message_count().await.unwrap(), 0);
    assert_eq!(third.router().index_size(), 0);
}
