//! Forged KV events on the event plane (in-process planes, a live mock
//! worker): events for a worker discovery never announced do not reach the
//! index and are counted; the announced worker's events still do.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kvrouter_core::protocols::{
    KvCacheEvent, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData, RouterEvent,
};
use kvrouter_core::{ExternalSequenceBlockHash, KvRouterConfig, LocalBlockHash};
use kvrouter_mocker::service::{self, WorkerConfig};
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::node::Node;

mod common;

fn stored(worker: u64, id: u64) -> Bytes {
    let ev = RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: id,
            data: KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: None,
                blocks: vec![KvCacheStoredBlockData {
                    block_hash: ExternalSequenceBlockHash(1_000_000 + id),
                    tokens_hash: LocalBlockHash(2_000_000 + id),
                    mm_extra_info: None,
                }],
            }),
            dp_rank: 0,
        },
    );
    Bytes::from(serde_json::to_vec(&ev).unwrap())
}

#[tokio::test]
async fn events_of_unannounced_workers_never_reach_the_index() {
    let node = Node::in_process();
    let endpoint: EndpointId = "forged.backend.generate".parse().unwrap();
    let _w = service::start(&node, &endpoint, 7, WorkerConfig::default())
        .await
        .unwrap();
    let pool = common::pool(&node, &endpoint, KvRouterConfig::default(), 1).await;
    let subject = kvrouter_runtime::subjects::kv_events(&endpoint);
    // A flood for a phantom worker, and one event for the real one.
    let flood = 5000u64;
    for i in 0..flood {
        node.events
            .publish(&subject, stored(424_242, i))
            .await
            .unwrap();
    }
    node.events.publish(&subject, stored(7, 1)).await.unwrap();
    let rejected = || {
        pool.router()
            .metrics()
            .events_rejected
            .with_label_values(&["unknown_worker"])
            .get()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let has = |w: u64| pool.router().dump_events().iter().any(|e| e.worker_id == w);
    while !has(7) {
        assert!(
            Instant::now() < deadline,
            "the announced worker's event never applied"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!has(424_242), "phantom blocks reached the index");
    // Past the per-worker hold, the rest were rejected at once.
    assert!(
        rejected() >= flood - kvrouter_router::admit::HOLD_PER_WORKER as u64,
        "rejected {}",
        rejected()
    );
}
