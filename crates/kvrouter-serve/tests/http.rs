//! Black-box HTTP tests of the embedded deployment (`kvrouter serve`): a real
//! listener on port 0, real mock workers on loopback TCP, a real HTTP client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kvrouter_core::busy::LoadThresholds;
use kvrouter_core::{KvRouterConfig, RouterMode};
use kvrouter_frontend::serve::RoutingConfig;
use kvrouter_frontend::{HttpOptions, Preprocessor};
use kvrouter_mocker::engine::EngineConfig;
use kvrouter_serve::{Embedded, EmbeddedConfig};
use serde_json::{Value, json};

struct Setup {
    mode: RouterMode,
    workers: u32,
    kv: KvRouterConfig,
    thresholds: LoadThresholds,
    speedup: f64,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            mode: RouterMode::Kv,
            workers: 4,
            kv: KvRouterConfig::default(),
            thresholds: LoadThresholds::default(),
            speedup: 50.0,
        }
    }
}

struct Server {
    embedded: Embedded,
    base: String,
    http: reqwest::Client,
}

async fn start(s: Setup) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = EmbeddedConfig {
        model_name: "mock-model".into(),
        workers: s.workers,
        engine: EngineConfig {
            speedup_ratio: s.speedup,
            ..EngineConfig::default()
        },
        data_parallel_size: 1,
        routing: RoutingConfig {
            mode: s.mode,
            kv: s.kv,
            thresholds: s.thresholds,
            block_size: 64,
            prefill_endpoint: None,
            enforce_disagg: false,
            migration_limit: 0,
        },
        http: HttpOptions::default(),
        namespace: "test".into(),
        eos_probability: 0.0,
        script: None,
    };
    let embedded = Embedded::start(cfg, Arc::new(Preprocessor::builtin()), listener)
        .await
        .unwrap();
    let base = format!("http://{}", embedded.frontend.addr);
    Server {
        embedded,
        base,
        http: reqwest::Client::new(),
    }
}

impl Server {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn state(&self) -> Value {
        serde_json::from_str(&self.get("/router/state").await.1).unwrap()
    }

    /// Polls the router state until `f` holds (or fails after 10 s).
    async fn until(&self, what: &str, f: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.state().await;
            if f(&st) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {st}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metric(&self, name_and_labels: &str) -> f64 {
        let text = self.get("/metrics").await.1;
        text.lines()
            .filter(|l| l.starts_with(name_and_labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn active_requests(st: &Value) -> u64 {
    st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["active_requests"].as_u64().unwrap())
        .sum()
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
}

/// Reads an SSE body into its `data:` payloads.
async fn sse(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[tokio::test]
async fn chat_and_completions_unary() {
    let s = start(Setup::default()).await;
    let (status, v) = s.post("/v1/chat/completions", chat("Hello", 7)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert_eq!(v["usage"]["completion_tokens"], 7);
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 3);
    assert_eq!(v["usage"]["total_tokens"].as_u64().unwrap(), prompt + 7);
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());

    let (status, v) = s
        .post(
            "/v1/completions",
            json!({"model": "mock-model", "prompt": "Once upon a time"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    // OpenAI's default for legacy completions.
    assert_eq!(v["usage"]["completion_tokens"], 16);
    let (status, v) = s
        .post(
            "/v1/completions",
            json!({"model": "mock-model", "prompt": [1, 2, 3, 4, 5], "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 5);

    let (status, body) = s.get("/v1/models").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"][0]["id"], "mock-model");
    assert_eq!(s.get("/health").await.0, 200);
    assert_eq!(s.get("/live").await.0, 200);
    s.embedded.shutdown().await.unwrap();
}

#[tokio::test]
async fn chat_and_completions_stream() {
    let s = start(Setup::default()).await;
    let mut body = chat("Stream to me", 5);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse(resp).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);

    let resp = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"model": "mock-model", "prompt": "abc", "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    let events = sse(resp).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "text_completion");
    assert!(!events.iter().any(|e| e.contains("\"usage\"")));
    s.embedded.shutdown().await.unwrap();
}

#[tokio::test]
async fn errors_have_openai_shape_and_status() {
    let s = start(Setup::default()).await;
    let raw = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let v: Value = raw.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid request body")
    );

    let cases = [
        (json!({"model": "mock-model"}), 400, "messages"),
        (
            json!({"model": "mock-model", "messages": [{"role": "user", "content": "x"}], "temperature": 7}),
            400,
            "temperature",
        ),
        (
            json!({"model": "mock-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": "mock-model", "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            "role",
        ),
        (
            json!({"model": "mock-model", "messages": [{"role": "user", "content": "x"}], "n": 2}),
            400,
            "`n`",
        ),
        (chat("x", 1).tap_model("gpt-9"), 404, "gpt-9"),
    ];
    for (body, status, needle) in cases {
        let (got, v) = s.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(got, status, "{body} -> {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg:?} should mention {needle}");
    }
    // Longer than the built-in model's 32,768-token context.
    let long = "word ".repeat(40_000);
    let (got, v) = s.post("/v1/chat/completions", chat(&long, 4)).await;
    assert_eq!(got, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (got, v) = s
        .post(
            "/v1/completions",
            json!({"model": "mock-model", "prompt": [1, 2], "max_tokens": 40_000}),
        )
        .await;
    assert_eq!(got, 400);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(s.get("/nowhere").await.0, 404);
    s.embedded.shutdown().await.unwrap();
}

trait TapModel {
    fn tap_model(self, m: &str) -> Value;
}

impl TapModel for Value {
    fn tap_model(mut self, m: &str) -> Value {
        self["model"] = json!(m);
        self
    }
}

#[tokio::test]
async fn no_workers_is_503_and_removed_workers_leave_routing() {
    let mut s = start(Setup {
        workers: 2,
        ..Setup::default()
    })
    .await;
    let ids = s.embedded.worker_ids();
    assert!(s.embedded.remove_worker(ids[0]));
    s.until("one worker left", |st| {
        st["workers"].as_array().unwrap().len() == 1
    })
    .await;
    let (status, v) = s
        .post("/v1/chat/completions", chat("still served", 2))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["nvext"]["worker_id"], ids[1]);
    assert!(s.embedded.remove_worker(ids[1]));
    s.until("no workers", |st| {
        st["workers"].as_array().unwrap().is_empty()
    })
    .await;
    let (status, v) = s.post("/v1/chat/completions", chat("anyone?", 2)).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "no_workers");
    assert_eq!(s.get("/health").await.0, 503);
    s.embedded.shutdown().await.unwrap();
}

/// A prompt of about `blocks` KV blocks sharing a prefix, plus a distinct tail.
fn shared_prefix_prompt(tail: usize) -> String {
    let mut p = String::from("System context: ");
    for i in 0..300 {
        p.push_str(&format!("fact {i} about routing; "));
    }
    p.push_str(&format!("Question number {tail}?"));
    p
}

async fn workers_for_shared_prefix(
    s: &Server,
    n: usize,
    body: impl Fn(usize) -> Value,
) -> Vec<u64> {
    // Prime one worker, and wait until its blocks are indexed.
    let (status, v) = s.post("/v1/chat/completions", body(0)).await;
    assert_eq!(status, 200, "{v}");
    s.until("prompt blocks indexed", |st| {
        st["indexed_blocks"].as_u64().unwrap() > 10
    })
    .await;
    let mut seen = vec![v["nvext"]["worker_id"].as_u64().unwrap()];
    for i in 1..n {
        let (status, v) = s.post("/v1/chat/completions", body(i)).await;
        assert_eq!(status, 200, "{v}");
        seen.push(v["nvext"]["worker_id"].as_u64().unwrap());
    }
    seen
}

/// Sends `n` shared-prefix requests one after another; returns their workers.
async fn route_one_by_one(s: &Server, n: usize) -> Vec<u64> {
    let mut seen = Vec::new();
    for i in 0..n {
        let (status, v) = s
            .post("/v1/chat/completions", chat(&shared_prefix_prompt(i), 2))
            .await;
        assert_eq!(status, 200, "{v}");
        seen.push(v["nvext"]["worker_id"].as_u64().unwrap());
    }
    seen
}

fn distinct(v: &[u64]) -> usize {
    let mut d = v.to_vec();
    d.sort_unstable();
    d.dedup();
    d.len()
}

#[tokio::test]
async fn kv_mode_keeps_a_shared_prefix_on_one_worker() {
    let s = start(Setup::default()).await;
    let seen = workers_for_shared_prefix(&s, 8, |i| chat(&shared_prefix_prompt(i), 2)).await;
    assert_eq!(distinct(&seen), 1, "{seen:?}");
    // The worker reports the prefix as cached, and the router predicted it.
    let (_, v) = s
        .post("/v1/chat/completions", chat(&shared_prefix_prompt(99), 2))
        .await;
    assert!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= 64 * 10
    );
    assert!(v["nvext"]["overlap_blocks"].as_u64().unwrap() >= 10);
    assert!(
        s.metric("dynamo_kvrouter_kv_cache_events_applied{event_type=\"stored\",status=\"ok\"}")
            .await
            > 0.0
    );
    assert!(s.metric("dynamo_component_router_kv_hit_rate_count").await >= 9.0);
    s.embedded.shutdown().await.unwrap();
}

#[tokio::test]
async fn round_robin_spreads_a_shared_prefix() {
    let s = start(Setup {
        mode: RouterMode::RoundRobin,
        ..Setup::default()
    })
    .await;
    let seen = route_one_by_one(&s, 8).await;
    assert_eq!(distinct(&seen), 4, "{seen:?}");
    s.embedded.shutdown().await.unwrap();
}

#[tokio::test]
async fn overlap_weight_and_temperature_change_routing() {
    // Weight 0 (per request): load only — with requests held in flight, a shared
    // prefix spreads over workers instead of sticking.
    let s = start(Setup {
        speedup: 1.0,
        ..Setup::default()
    })
    .await;
    // With KV reuse assumed, requests sharing a prefix share decode blocks; the
    // load-only run counts each request's blocks separately so load differs.
    let body = |i: usize, w: f64, t: f64| {
        let mut b = chat(&shared_prefix_prompt(i), 40);
        let reuse = w > 0.0;
        b["nvext"] = json!({"router_config_override": {
            "overlap_score_weight": w, "router_temperature": t, "assume_kv_reuse": reuse,
        }});
        b
    };
    // Prime, then send concurrently so load differs while they run.
    let (_, v) = s.post("/v1/chat/completions", body(0, 1.0, 0.0)).await;
    let primed = v["nvext"]["worker_id"].as_u64().unwrap();
    s.until("indexed", |st| st["indexed_blocks"].as_u64().unwrap() > 10)
        .await;
    let run = |w: f64, t: f64| {
        let s = &s;
        async move {
            let futs = (1..=6).map(|i| s.post("/v1/chat/completions", body(i, w, t)));
            futures::future::join_all(futs)
                .await
                .into_iter()
                .map(|(st, v)| {
                    assert_eq!(st, 200, "{v}");
                    v["nvext"]["worker_id"].as_u64().unwrap()
                })
                .collect::<Vec<_>>()
        }
    };
    let sticky = run(1.0, 0.0).await;
    assert!(
        sticky.iter().filter(|w| **w == primed).count() >= 5,
        "W=1 keeps the prefix on its worker: {sticky:?}"
    );
    let balanced = run(0.0, 0.0).await;
    assert!(distinct(&balanced) >= 3, "W=0 balances load: {balanced:?}");
    // A high temperature samples among workers even where W=1 would stick.
    let sampled = run(1.0, 100.0).await;
    assert!(distinct(&sampled) >= 2, "T=100 samples: {sampled:?}");
    // An invalid override is the client's error.
    let (status, v) = s.post("/v1/chat/completions", body(1, -1.0, 0.0)).await;
    assert_eq!(status, 400, "{v}");
    s.embedded.shutdown().await.unwrap();
}

#[tokio::test]
async fn approximate_mode_routes_by_its_own_decisions() {
    let s = start(Setup {
        kv: KvRouterConfig {
            use_kv_events: false,
            ..KvRouterConfig::default()
        },
        ..Setup::default()
    })
    .await;
    let seen = route_one_by_one(&s, 6).await;
    assert_eq!(distinct(&seen), 1, "{seen:?}");
    // No events were consumed: the index holds only predicted blocks.
    assert_eq!(
        s.metric("dynamo_kvrouter_kv_cache_events_applied").await,
        0.0
    );
    s.embedded.shutdown().await.unwrap();
}

#[tokio::test]
async fn client_disconnect_frees_the_sequence() {
    let s = start(Setup {
        workers: 1,
        speedup: 1.0,
        ..Setup::default()
    })
    .await;
    let mut body = chat("Write a very long story.", 5000);
    body["stream"] = json!(true);
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    // Read until real content flows, so the request is past prefill.
    let mut seen = 0;
    while seen < 3 {
        let chunk = stream.next().await.unwrap().unwrap();
        seen += String::from_utf8_lossy(&chunk).matches("data: ").count();
    }
    s.until("request tracked", |st| active_requests(st) == 1)
        .await;
    assert_eq!(
        s.metric("dynamo_frontend_inflight_requests{model=\"mock-model\"}")
            .await,
        1.0
    );
    drop(stream);
    s.until("request freed after disconnect", |st| {
        active_requests(st) == 0 && st["workers"][0]["active_decode_blocks"].as_u64() == Some(0)
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while s
        .metric("dynamo_frontend_inflight_requests{model=\"mock-model\"}")
        .await
        != 0.0
    {
        assert!(Instant::now() < deadline, "inflight gauge not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.embedded.shutdown().await.unwrap();
}

#[tokio::test]
async fn busy_workers_get_503_until_thresholds_change() {
    let s = start(Setup {
        workers: 1,
        speedup: 1.0,
        thresholds: LoadThresholds {
            active_decode_blocks_threshold: Some(0.0),
            ..LoadThresholds::default()
        },
        ..Setup::default()
    })
    .await;
    let (status, body) = s.get("/busy_threshold").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["thresholds"][0]["active_decode_blocks_threshold"], 0.0);
    // An idle worker is not busy: the first request is served, and holds blocks.
    let mut long = chat(&shared_prefix_prompt(1), 5000);
    long["stream"] = json!(true);
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut held = resp.bytes_stream();
    let _ = held.next().await;
    s.until("worker busy", |st| st["workers"][0]["busy"] == true)
        .await;
    let (status, v) = s.post("/v1/chat/completions", chat("one more", 2)).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "all_workers_busy");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("--active-decode-blocks-threshold"), "{msg}");
    assert!(msg.contains("active_decode_blocks_threshold=0"), "{msg}");
    // Raise the threshold at run time: served again.
    let (status, v) = s
        .post(
            "/busy_threshold",
            json!({"model": "mock-model", "active_decode_blocks_threshold": 0.9}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["active_decode_blocks_threshold"], 0.9);
    let (status, v) = s.post("/v1/chat/completions", chat("one more", 2)).await;
    assert_eq!(status, 200, "{v}");
    // Bad updates are rejected and change nothing.
    let (status, _) = s
        .post(
            "/busy_threshold",
            json!({"model": "mock-model", "active_decode_blocks_threshold": 3.0}),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = s.post("/busy_threshold", json!({"model": "other"})).await;
    assert_eq!(status, 404);
    let (_, v) = s
        .post("/busy_threshold", json!({"model": "mock-model"}))
        .await;
    assert_eq!(v["active_decode_blocks_threshold"], 0.9);
    drop(held);
    s.embedded.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_use_reference_names() {
    let s = start(Setup::default()).await;
    let (status, _) = s
        .post("/v1/chat/completions", chat(&shared_prefix_prompt(0), 3))
        .await;
    assert_eq!(status, 200);
    let text = s.get("/metrics").await.1;
    let cache_hits = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("kvrouter_frontend_prompt_cache_hits_total "))
            .map(|v| v.parse::<u64>().unwrap())
    };
    let before = cache_hits(&text).expect("prompt cache counter");
    // The same prompt again: its text is tokenized from the cache.
    let (status, _) = s
        .post("/v1/chat/completions", chat(&shared_prefix_prompt(0), 3))
        .await;
    assert_eq!(status, 200);
    assert!(cache_hits(&s.get("/metrics").await.1).unwrap() > before);
    for name in [
        "dynamo_frontend_requests_total",
        "dynamo_frontend_time_to_first_token_seconds_bucket",
        "dynamo_frontend_inter_token_latency_seconds_bucket",
        "dynamo_frontend_input_sequence_tokens_bucket",
        "dynamo_frontend_output_sequence_tokens_bucket",
        "dynamo_frontend_inflight_requests",
        "dynamo_frontend_queued_requests",
        "dynamo_frontend_cached_tokens_bucket",
        "dynamo_frontend_worker_active_decode_blocks",
        "dynamo_frontend_worker_active_prefill_tokens",
        "dynamo_frontend_model_total_kv_blocks",
        "dynamo_component_router_requests_total",
        "dynamo_component_router_kv_hit_rate_bucket",
        "dynamo_routing_overhead_block_hashing_ms_bucket",
        "dynamo_routing_overhead_indexer_find_matches_ms_bucket",
        "dynamo_routing_overhead_seq_hashing_ms_bucket",
        "dynamo_routing_overhead_scheduling_ms_bucket",
        "dynamo_routing_overhead_total_ms_bucket",
        "dynamo_kvrouter_kv_cache_events_applied",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    assert_eq!(
        s.metric("dynamo_frontend_model_total_kv_blocks").await,
        4.0 * 16384.0
    );
    s.embedded.shutdown().await.unwrap();
}
