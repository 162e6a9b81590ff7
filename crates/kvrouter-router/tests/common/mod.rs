//! What the router's integration tests share: a worker pool over `endpoint`
//! with a fresh `kv` router, ready once `workers` workers are routable.

use std::sync::Arc;
use std::time::Duration;

use kvrouter_core::busy::LoadThresholds;
use kvrouter_core::{KvRouterConfig, RouterMode};
use kvrouter_router::{KvRouter, RouterMetrics, WorkerPool};
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::node::Node;
use tokio_util::sync::CancellationToken;

/// Block size of the mock workers' default engine.
pub const BLOCK: u32 = 64;

/// A `kv` router with `cfg` over `endpoint`'s workers, once `workers` are known.
pub async fn pool(
    node: &Node,
    endpoint: &EndpointId,
    cfg: KvRouterConfig,
    workers: usize,
) -> Arc<WorkerPool> {
    let router = KvRouter::new(
        RouterMode::Kv,
        cfg,
        BLOCK,
        LoadThresholds::default(),
        RouterMetrics::unregistered(),
    );
    let pool = WorkerPool::start(
        node.clone(),
        endpoint.clone(),
        router,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(
        pool.wait_for_workers(workers, Duration::from_secs(5)).await,
        "{workers} workers never registered"
    );
    pool
}
