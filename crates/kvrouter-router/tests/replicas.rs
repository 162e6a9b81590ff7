//! Two router replicas over one set of live mock workers (in-process planes):
//! with replica sync, load placed through one is visible to the other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvrouter_core::KvRouterConfig;
use kvrouter_core::llm::{PreprocessedRequest, StopConditions};
use kvrouter_mocker::service::{self, WorkerConfig};
use kvrouter_router::{RouteQuery, WorkerPool};
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::node::Node;

mod common;

async fn replica(node: &Node, endpoint: &EndpointId, sync: bool) -> Arc<WorkerPool> {
    let cfg = KvRouterConfig {
        router_replica_sync: sync,
        ..KvRouterConfig::default()
    };
    common::pool(node, endpoint, cfg, 2).await
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn active(pool: &WorkerPool, worker: u64) -> usize {
    pool.router()
        .state()
        .iter()
        .filter(|r| r.worker_id == worker)
        .map(|r| r.active_requests)
        .sum()
}

/// Routes a long request through replica A; returns what B sees of it and
/// how many of B's ten selections still went to the loaded worker.
async fn run(sync: bool) -> (usize, usize) {
    let node = Node::in_process();
    let endpoint: EndpointId = "rs.backend.generate".parse().unwrap();
    let cfg = WorkerConfig::default();
    let _w1 = service::start(&node, &endpoint, 1, cfg.clone())
        .await
        .unwrap();
    let _w2 = service::start(&node, &endpoint, 2, cfg).await.unwrap();
    let a = replica(&node, &endpoint, sync).await;
    let b = replica(&node, &endpoint, sync).await;
    let req = PreprocessedRequest {
        token_ids: (0..2000).map(|i| 3 + i % 3000).collect(),
        stop_conditions: StopConditions {
            max_tokens: Some(2000),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut held = a.generate(&req, "held-by-a").await.unwrap();
    let busy = held.worker_id();
    let _ = held.next().await;
    until("A tracks its request", || active(&a, busy) == 1).await;
    if sync {
        until("B sees A's request", || active(&b, busy) == 1).await;
    } else {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen_by_b = active(&b, busy);
    let to_busy = (0..10u32)
        .filter(|i| {
            let tokens: Vec<u32> = (0..256).map(|t| 3 + (t * 31 + i * 977) % 3900).collect();
            let r = b
                .router()
                .select(&RouteQuery {
                    tokens: &tokens,
                    ..RouteQuery::default()
                })
                .unwrap();
            r.worker.worker_id == busy
        })
        .count();
    drop(held);
    if sync {
        until("B sees the request freed", || active(&b, busy) == 0).await;
    }
    (seen_by_b, to_busy)
}

#[tokio::test]
async fn replicas_share_load_with_sync() {
    let (seen, to_busy) = run(true).await;
    assert_eq!(seen, 1);
    assert_eq!(to_busy, 0, "B avoids the worker A loaded");
}

#[tokio::test]
async fn without_sync_replicas_are_blind_to_each_other() {
    // B's model of the loaded worker stays empty (which worker B then picks
    // depends on tie-breaks, so it is not asserted).
    let (seen, _) = run(false).await;
    assert_eq!(seen, 0);
}
