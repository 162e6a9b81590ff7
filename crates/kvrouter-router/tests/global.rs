//! The global router end to end (in-process planes): two decode pools, each a
//! standalone router over its own mock worker; requests land in the pool the
//! grid names, and the pool's answer streams back through the global router.

use bytes::Bytes;
use kvrouter_core::KvRouterConfig;
use kvrouter_core::llm::{LlmEngineOutput, PreprocessedRequest, StopConditions};
use kvrouter_mocker::engine::EngineConfig;
use kvrouter_mocker::service::{self, MockWorker, WorkerConfig};
use kvrouter_router::global::{GlobalRouter, GlobalRouterConfig, PoolConfig};
use kvrouter_router::standalone::StandaloneRouter;
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::node::Node;
use serde_json::json;

mod common;

async fn pool(node: &Node, ns: &str, id: u64) -> (MockWorker, StandaloneRouter) {
    let endpoint: EndpointId = format!("{ns}.backend.generate").parse().unwrap();
    let cfg = WorkerConfig {
        engine: EngineConfig {
            speedup_ratio: 50.0,
            ..EngineConfig::default()
        },
        ..WorkerConfig::default()
    };
    let worker = service::start(node, &endpoint, id, cfg).await.unwrap();
    let p = common::pool(node, &endpoint, KvRouterConfig::default(), 1).await;
    let service = StandaloneRouter::start(node, ns, id + 100, p)
        .await
        .unwrap();
    (worker, service)
}

fn routed(s: &StandaloneRouter) -> u64 {
    s.pool
        .router()
        .metrics()
        .requests
        .with_label_values(&["kv", "ok"])
        .get()
}

#[tokio::test]
async fn requests_land_in_the_configured_pool() {
    let node = Node::in_process();
    let (_w0, short) = pool(&node, "short", 1).await;
    let (_w1, long) = pool(&node, "long", 2).await;
    let pools: PoolConfig = serde_json::from_value(json!({
        "num_prefill_pools": 1, "num_decode_pools": 2,
        "prefill_pool_dynamo_namespaces": ["short"],
        "decode_pool_dynamo_namespaces": ["short", "long"],
        "prefill_pool_selection_strategy": {
            "isl_min": 0, "isl_max": 8000, "isl_resolution": 1,
            "ttft_min": 10.0, "ttft_max": 100.0, "ttft_resolution": 1,
            "prefill_pool_mapping": [[0]]
        },
        "decode_pool_selection_strategy": {
            "context_length_min": 0, "context_length_max": 4000, "context_length_resolution": 2,
            "itl_min": 5.0, "itl_max": 25.0, "itl_resolution": 2,
            // Long contexts go to "long" unless the ITL target is tight.
            "decode_pool_mapping": [[0, 0], [0, 1]]
        }
    }))
    .unwrap();
    assert!(pools.validate().is_empty());
    let registry = prometheus::Registry::new();
    let _global = GlobalRouter::start(
        &node,
        "dynamo",
        "global_router",
        999,
        GlobalRouterConfig {
            pools,
            model_name: "m".into(),
            default_ttft_target: None,
            default_itl_target: Some(20.0),
        },
        &registry,
    )
    .await
    .unwrap();
    let target: EndpointId = "dynamo.global_router.generate".parse().unwrap();
    let address = node.discovery.list(&target).await.unwrap()[0]
        .address
        .clone();
    let send = |len: u32, extra: serde_json::Value| {
        let node = node.clone();
        let address = address.clone();
        async move {
            let req = PreprocessedRequest {
                token_ids: (0..len).map(|i| 3 + i % 3000).collect(),
                stop_conditions: StopConditions {
                    max_tokens: Some(2),
                    ..Default::default()
                },
                extra_args: Some(extra),
                ..Default::default()
            };
            let body = Bytes::from(serde_json::to_vec(&req).unwrap());
            let mut r = node.call(&address, body).await.unwrap();
            let mut outs = Vec::new();
            while let Some(item) = r.next().await {
                outs.push(serde_json::from_slice::<LlmEngineOutput>(&item.unwrap()).unwrap());
            }
            outs
        }
    };
    // Short context: pool "short".
    let outs = send(100, json!({})).await;
    assert_eq!(outs.len(), 2);
    assert!(outs[1].finish_reason.is_some());
    assert_eq!((routed(&short), routed(&long)), (1, 0));
    // Long context at the default ITL target (20 ms, upper band): pool "long".
    send(3000, json!({})).await;
    assert_eq!((routed(&short), routed(&long)), (1, 1));
    // Long context with a tight ITL target from the request: back to "short".
    send(3000, json!({"itl_target": 6.0})).await;
    assert_eq!((routed(&short), routed(&long)), (2, 1));
    let text = {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    };
    assert!(
        text.contains("dynamo_global_router_requests_total{pool=\"1\",pool_type=\"decode\"} 1"),
        "{text}"
    );
    // A pool without a router answers a typed error.
    drop(long);
    let req = PreprocessedRequest {
        token_ids: (0..3000).collect(),
        ..Default::default()
    };
    let mut r = node
        .call(&address, Bytes::from(serde_json::to_vec(&req).unwrap()))
        .await
        .unwrap();
    let err = r.next().await.unwrap().unwrap_err().to_string();
    assert!(err.contains("no_workers"), "{err}");
}
