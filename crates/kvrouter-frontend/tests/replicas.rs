//! Two frontends over one worker set with `--router-replica-sync`: load placed
//! through one frontend shows in the other's router state and steers its
//! selection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kvrouter_core::busy::LoadThresholds;
use kvrouter_core::{KvRouterConfig, RouterMode};
use kvrouter_frontend::serve::{FrontendHandle, RoutingConfig, start_frontend};
use kvrouter_frontend::{HttpOptions, Preprocessor};
use kvrouter_mocker::service::{self, WorkerConfig};
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::node::Node;
use serde_json::{Value, json};

async fn frontend(node: &Node, endpoint: &EndpointId) -> FrontendHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let f = start_frontend(
        node.clone(),
        endpoint.clone(),
        "mock-model".into(),
        Arc::new(Preprocessor::builtin()),
        RoutingConfig {
            mode: RouterMode::Kv,
            kv: KvRouterConfig {
                router_replica_sync: true,
                ..KvRouterConfig::default()
            },
            thresholds: LoadThresholds::default(),
            block_size: 64,
            prefill_endpoint: None,
            enforce_disagg: false,
            migration_limit: 0,
        },
        HttpOptions::default(),
        listener,
    )
    .await
    .unwrap();
    assert!(
        f.frontend
            .pool()
            .unwrap()
            .wait_for_workers(2, Duration::from_secs(5))
            .await
    );
    f
}

async fn state(client: &reqwest::Client, f: &FrontendHandle) -> Value {
    client
        .get(format!("http://{}/router/state", f.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn active_on(st: &Value, worker: u64) -> u64 {
    st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["worker_id"] == worker)
        .map(|w| w["active_requests"].as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn load_through_one_frontend_is_seen_by_the_other() {
    let node = Node::in_process();
    let endpoint: EndpointId = "sync.backend.generate".parse().unwrap();
    let cfg = WorkerConfig::default();
    let _w1 = service::start(&node, &endpoint, 1, cfg.clone())
        .await
        .unwrap();
    let _w2 = service::start(&node, &endpoint, 2, cfg).await.unwrap();
    let a = frontend(&node, &endpoint).await;
    let b = frontend(&node, &endpoint).await;
    let client = reqwest::Client::new();
    // A long streaming request through frontend A.
    let resp = client
        .post(format!("http://{}/v1/chat/completions", a.addr))
        .json(
            &json!({"model": "mock-model", "max_tokens": 3000, "stream": true,
                      "messages": [{"role": "user", "content": "long ".repeat(500)}]}),
        )
        .send()
        .await
        .unwrap();
    let mut held = resp.bytes_stream();
    let _ = held.next().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let (busy, seen) = loop {
        let sa = state(&client, &a).await;
        let busy = [1u64, 2].into_iter().find(|w| active_on(&sa, *w) == 1);
        if let Some(w) = busy {
            let sb = state(&client, &b).await;
            if active_on(&sb, w) == 1 || Instant::now() > deadline {
                break (w, active_on(&sb, w));
            }
        }
        assert!(Instant::now() < deadline, "A never tracked its request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(seen, 1, "B sees A's request on worker {busy}");
    // B now sends new work to the other worker.
    for i in 0..4 {
        let v: Value = client
            .post(format!("http://{}/v1/chat/completions", b.addr))
            .json(&json!({"model": "mock-model", "max_tokens": 1,
                          "messages": [{"role": "user", "content": format!("question {i}")}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_ne!(v["nvext"]["worker_id"], busy, "{v}");
    }
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while active_on(&state(&client, &b).await, busy) != 0 {
        assert!(Instant::now() < deadline, "B never saw the request end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
