//! Disaggregated serving end to end (in-process planes, real sockets): the
//! frontend prefills through a prefill pool's standalone router, then decodes
//! on a decode worker that receives the prompt's KV instead of computing it.

use std::sync::Arc;
use std::time::Duration;

use kvrouter_core::busy::LoadThresholds;
use kvrouter_core::{KvRouterConfig, RouterMode};
use kvrouter_frontend::serve::{RoutingConfig, start_frontend};
use kvrouter_frontend::{HttpOptions, Preprocessor};
use kvrouter_mocker::engine::EngineConfig;
use kvrouter_mocker::service::{self, Role, WorkerConfig};
use kvrouter_router::standalone::StandaloneRouter;
use kvrouter_router::{KvRouter, RouterMetrics, WorkerPool};
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::node::Node;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn worker(role: Role) -> WorkerConfig {
    WorkerConfig {
        engine: EngineConfig {
            speedup_ratio: 50.0,
            ..EngineConfig::default()
        },
        role,
        ..WorkerConfig::default()
    }
}

#[tokio::test]
async fn prefill_pool_then_decode_with_transferred_kv() {
    let node = Node::in_process();
    let prefill_workers: EndpointId = "pf.backend.generate".parse().unwrap();
    let decode_workers: EndpointId = "dec.backend.generate".parse().unwrap();
    let _p = service::start(&node, &prefill_workers, 1, worker(Role::Prefill))
        .await
        .unwrap();
    let _d1 = service::start(&node, &decode_workers, 2, worker(Role::Decode))
        .await
        .unwrap();
    let _d2 = service::start(&node, &decode_workers, 3, worker(Role::Decode))
        .await
        .unwrap();
    // The prefill pool's router: no decode load to track.
    let prefill_router = KvRouter::new(
        RouterMode::Kv,
        KvRouterConfig {
            router_track_active_blocks: false,
            ..KvRouterConfig::default()
        },
        64,
        LoadThresholds::default(),
        RouterMetrics::unregistered(),
    );
    let pool = WorkerPool::start(
        node.clone(),
        prefill_workers,
        prefill_router,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(pool.wait_for_workers(1, Duration::from_secs(5)).await);
    let prefill_service = StandaloneRouter::start(&node, "pf", 100, pool)
        .await
        .unwrap();
    // The frontend routes decode by load only (overlap weight 0).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = start_frontend(
        node.clone(),
        decode_workers,
        "mock-model".into(),
        Arc::new(Preprocessor::builtin()),
        RoutingConfig {
            mode: RouterMode::Kv,
            kv: KvRouterConfig {
                overlap_score_weight: 0.0,
                ..KvRouterConfig::default()
            },
            thresholds: LoadThresholds::default(),
            block_size: 64,
            prefill_endpoint: Some("pf.router.generate".parse().unwrap()),
            enforce_disagg: true,
            migration_limit: 0,
        },
        HttpOptions::default(),
        listener,
    )
    .await
    .unwrap();
    assert!(
        front
            .frontend
            .pool()
            .unwrap()
            .wait_for_workers(2, Duration::from_secs(5))
            .await
    );
    let url = format!("http://{}/v1/chat/completions", front.addr);
    let client = reqwest::Client::new();
    let body = json!({"model": "mock-model", "max_tokens": 5, "messages": [
        {"role": "user", "content": "Summarise the routing design in detail. ".repeat(40)}]});
    let r = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    // The decode worker computed nothing but the last partial block: the KV came from prefill.
    assert!(cached >= (prompt / 64 - 1) * 64 && prompt > 300, "{v}");
    let prefilled = prefill_service
        .pool
        .router()
        .metrics()
        .requests
        .with_label_values(&["kv", "ok"])
        .get();
    assert_eq!(prefilled, 1);
    // Without the prefill pool and with --enforce-disagg: 503, not a silent fallback.
    drop(prefill_service);
    let r = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--enforce-disagg"),
        "{v}"
    );
}
