//! The services as separate processes over real servers: `kvrouter mocker`
//! and `kvrouter router` registering in a real etcd, KV events over a real
//! NATS, requests over TCP; `kvrouter call` talking to the router's endpoints.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Fleet;
use serde_json::{Value, json};

fn prompt(n: u32) -> Vec<u32> {
    (0..n).map(|i| 3 + (i * 7919) % 4000).collect()
}

#[test]
fn standalone_router_serves_generate_and_best_worker_id() {
    let mut f = Fleet::start();
    f.spawn(&[
        "mocker",
        "--endpoint",
        "fleet.backend.generate",
        "--num-workers",
        "2",
        "--speedup-ratio",
        "50",
        "--namespace",
        "fleet",
    ]);
    f.spawn(&[
        "router",
        "--endpoint",
        "fleet.backend.generate",
        "--block-size",
        "64",
        "--namespace",
        "fleet",
    ]);
    // Generate through the router: the worker's outputs stream back.
    let tokens = prompt(640);
    let body = json!({"model": "mock-model", "token_ids": tokens, "stop_conditions": {"max_tokens": 3, "ignore_eos": true}});
    // The router can be up before discovery has shown it the workers; until
    // then it answers `no_workers` at once, which is right, so wait that out.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (code, lines) = loop {
        let (code, lines) = f.call("fleet.router.generate", &body);
        let no_workers = lines
            .first()
            .is_some_and(|l| l["error"]["code"] == "no_workers");
        if !no_workers || Instant::now() > deadline {
            break (code, lines);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[2]["finish_reason"], "length");
    assert_eq!(lines[2]["completion_usage"]["completion_tokens"], 3);
    // The worker's KV events reached the router over NATS: the prompt is now cached.
    let deadline = Instant::now() + Duration::from_secs(20);
    let best = loop {
        let (code, lines) = f.call("fleet.router.best_worker_id", &json!({"token_ids": tokens}));
        assert_eq!(code, 0, "{lines:?}");
        if lines[0]["overlap_blocks"].as_u64() == Some(10) {
            break lines[0].clone();
        }
        assert!(Instant::now() < deadline, "never indexed: {lines:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(best["worker_id"].as_u64().unwrap() > 0);
    // Asking again changes nothing: the answer is stable.
    let (_, again) = f.call("fleet.router.best_worker_id", &json!({"token_ids": tokens}));
    assert_eq!(again[0], best);
    // Typed errors, never a hang.
    let (code, lines) = f.call("fleet.router.best_worker_id", &json!({"token_ids": []}));
    assert_eq!(code, 1);
    assert_eq!(lines[0]["error"]["code"], "invalid_request");
    let (code, lines) = f.call("fleet.router.generate", &json!({"model": "m"}));
    assert_eq!(code, 1);
    assert_eq!(lines[0]["error"]["code"], "invalid_request");
    // No instance at all: exit 3 after the wait.
    let out = f
        .cmd(&["call", "fleet.nobody.generate", "{}", "--wait", "0.5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}

/// `kvrouter frontend --router-endpoint`: the OpenAI API in front of a
/// standalone router, each a process of its own.
#[test]
fn frontend_routes_through_a_standalone_router() {
    use std::io::BufRead;
    let mut f = Fleet::start();
    f.spawn(&[
        "mocker",
        "--endpoint",
        "front.backend.generate",
        "--num-workers",
        "2",
        "--speedup-ratio",
        "50",
        "--namespace",
        "front",
    ]);
    // Port 0: the router binds one and prints it (no port reserved and raced for).
    let mut router = f
        .cmd(&[
            "router",
            "--endpoint",
            "front.backend.generate",
            "--block-size",
            "64",
            "--namespace",
            "front",
        ])
        .env("DYN_SYSTEM_PORT", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(router.stderr.take().unwrap());
    let metrics_url = loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "the router exited");
        if let Some(u) = line.split_whitespace().find(|w| w.starts_with("http://")) {
            break u.to_string();
        }
    };
    std::thread::spawn(move || for _ in err.lines() {});
    f.children.push(router);
    let mut frontend = f
        .cmd(&[
            "frontend",
            "--router-endpoint",
            "front.router.generate",
            "--namespace",
            "front",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--model-name",
            "mock-model",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(frontend.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    f.children.push(frontend);
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let long = "a shared system prompt about routing ".repeat(60);
    rt.block_on(async {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        // The router instance may register a moment after the frontend starts.
        let v: Value = loop {
            let r = client
                .post(format!("{url}/v1/chat/completions"))
                .json(
                    &json!({"model": "mock-model", "max_tokens": 4, "ignore_eos": true,
                              "messages": [{"role": "user", "content": long}]}),
                )
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                break r.json().await.unwrap();
            }
            assert!(Instant::now() < deadline, "never served: {}", r.status());
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
        // The standalone router made the decision: its own metrics count it.
        let metrics = client
            .get(metrics_url.replace("0.0.0.0", "127.0.0.1"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains(
                "dynamo_component_router_requests_total{router_mode=\"kv\",status=\"ok\"} 1"
            ),
            "{metrics}"
        );
        assert!(metrics.contains("dynamo_routing_overhead_total_ms_count 1"));
    });
}

/// `kvrouter engine` over real etcd and NATS: a stand-in vLLM engine joins
/// the fleet through its sidecar; a standalone router follows its KV events
/// (republished on NATS), answers `best_worker_id` with the engine's URL, and
/// `generate` reaches the engine as a token-id prompt, its cached tokens
/// reported back; a router restarted without JetStream rebuilds the engine's
/// blocks from the sidecar.
#[test]
fn an_external_engine_joins_through_its_sidecar() {
    let mut f = Fleet::start();
    // The stand-in picks its own ports; the sidecar asks it for its event ports.
    let mut standin = f
        .cmd(&[
            "mocker",
            "--openai-host",
            "127.0.0.1",
            "--openai-port",
            "0",
            "--zmq-kv-events-port",
            "0",
            "--zmq-replay-port",
            "0",
            "--block-size",
            "16",
            "--speedup-ratio",
            "50",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = std::io::BufReader::new(standin.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    std::thread::spawn(move || for _ in std::io::BufRead::lines(out) {});
    f.children.push(standin);
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim_end_matches(',')
        .to_string();
    f.spawn(&[
        "engine",
        "--url",
        &url,
        "--endpoint",
        "ext.backend.generate",
        "--namespace",
        "ext",
    ]);
    f.spawn(&[
        "router",
        "--endpoint",
        "ext.backend.generate",
        "--block-size",
        "16",
        "--namespace",
        "ext",
    ]);
    let tokens = prompt(160);
    let body = json!({"model": "mock-model", "token_ids": tokens, "stop_conditions": {"max_tokens": 3, "ignore_eos": true}});
    // The sidecar registers once its engine answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    let lines = loop {
        let (code, lines) = f.call("ext.router.generate", &body);
        if code == 0 {
            break lines;
        }
        assert!(Instant::now() < deadline, "never served: {lines:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let last = lines.last().unwrap();
    assert_eq!(last["finish_reason"], "length", "{lines:?}");
    assert_eq!(last["completion_usage"]["completion_tokens"], 3);
    let ids: usize = lines
        .iter()
        .map(|l| l["token_ids"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(ids, 3, "the engine's token ids came back: {lines:?}");
    // The engine's events reached the router through the sidecar.
    let deadline = Instant::now() + Duration::from_secs(20);
    let best = loop {
        let (code, lines) = f.call("ext.router.best_worker_id", &json!({"token_ids": tokens}));
        assert_eq!(code, 0, "{lines:?}");
        if lines[0]["overlap_blocks"].as_u64() == Some(10) {
            break lines[0].clone();
        }
        assert!(Instant::now() < deadline, "never indexed: {lines:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(best["engine_url"], url.as_str());
    // The router is killed and a new one starts (no JetStream): it rebuilds
    // the engine's blocks by asking the sidecar, with no new request.
    let mut old = f.children.pop().expect("the router");
    old.kill().unwrap();
    old.wait().unwrap();
    f.spawn(&[
        "router",
        "--endpoint",
        "ext.backend.generate",
        "--block-size",
        "16",
        "--namespace",
        "ext",
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, lines) = f.call("ext.router.best_worker_id", &json!({"token_ids": tokens}));
        if code == 0 && lines[0]["overlap_blocks"].as_u64() == Some(10) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted router never rebuilt the engine's blocks: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The same prompt again: the engine reports the prefix the router predicted.
    let (code, lines) = f.call("ext.router.generate", &body);
    assert_eq!(code, 0, "{lines:?}");
    let cached =
        lines.last().unwrap()["completion_usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
    assert_eq!(
        cached,
        10 * 16 - 16,
        "all but the block recomputed for the first token"
    );
}
