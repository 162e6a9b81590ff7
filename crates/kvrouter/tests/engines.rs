//! `kvrouter serve --engine` over stand-in engines (`kvrouter mocker
//! --openai-port`, vLLM's wire formats), every one a separate process on
//! loopback: requests sharing a prefix land where the engines' KV events
//! say, the engine's cached tokens match the router's predicted overlap, a
//! restarted router rebuilds its index from the engines' replay buffers, an
//! engine restart clears and rebuilds its blocks, a killed engine gives the
//! client a clean error and leaves routing within 2 s, and an engine's 400
//! reaches the client unchanged.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BS: u32 = 16;

use kvrouter_runtime::testing::free_port;

fn kvrouter() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvrouter"));
    for (k, _) in std::env::vars() {
        if k.starts_with("DYN_") {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "warn");
    c
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One stand-in engine. Ports are the OS's choice (read back from its banner
/// and `/kv_event_sources`, which the router then discovers by itself), or
/// fixed ones for an engine that must come back on the same ports.
struct Engine {
    proc: Option<Proc>,
    /// `(http, zmq, replay)` when fixed.
    fixed: Option<(u16, u16, u16)>,
    /// Publishes no KV events at all.
    silent: bool,
    extra: Vec<&'static str>,
    url: String,
    speedup: &'static str,
    block_size: u32,
}

impl Engine {
    fn new(speedup: &'static str) -> Self {
        Self {
            proc: None,
            fixed: None,
            silent: false,
            extra: Vec::new(),
            url: String::new(),
            speedup,
            block_size: BS,
        }
    }

    /// An engine with no KV events (routed approximately).
    fn silent(speedup: &'static str) -> Self {
        Self {
            silent: true,
            ..Self::new(speedup)
        }
    }

    /// An engine that restarts on the same ports (named in `--engine`).
    fn fixed(speedup: &'static str) -> Self {
        Self {
            fixed: Some((free_port(), free_port(), free_port())),
            ..Self::new(speedup)
        }
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    /// Extra flags for the stand-in (model name, block size, …).
    fn with(mut self, args: &[&'static str]) -> Self {
        self.extra = args.to_vec();
        self
    }

    fn spec(&self) -> String {
        match self.fixed {
            Some((_, zmq, replay)) => format!(
                "{},kv-events=tcp://127.0.0.1:{zmq},replay=tcp://127.0.0.1:{replay}",
                self.url
            ),
            // Event ports are asked of the engine (/kv_event_sources).
            None => self.url.clone(),
        }
    }

    async fn start(&mut self) {
        let (http, zmq, replay) = self.fixed.unwrap_or((0, 0, 0));
        let mut cmd = kvrouter();
        cmd.args(["mocker", "--openai-host", "127.0.0.1"])
            .args(["--openai-port", &http.to_string()]);
        if !self.silent {
            cmd.args(["--zmq-kv-events-port", &zmq.to_string()])
                .args(["--zmq-replay-port", &replay.to_string()]);
        }
        let mut child = cmd
            .args([
                "--block-size",
                &self.block_size.to_string(),
                "--speedup-ratio",
                self.speedup,
            ])
            .args(["--num-gpu-blocks", "4096"])
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        self.proc = Some(Proc(child));
        self.url = banner_url(stdout).await;
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client.get(format!("{}/health", self.url())).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "stand-in engine never came up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        drop(self.proc.take());
    }
}

/// The `http://…` address a service prints on its first line.
async fn banner_url(stdout: std::process::ChildStdout) -> String {
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let mut r = std::io::BufReader::new(stdout);
        r.read_line(&mut line).unwrap();
        // Keep draining, so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in r.lines() {});
        line
    })
    .await
    .unwrap();
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim_end_matches(',')
        .to_string()
}

/// `kvrouter serve --engine SPEC` with its log kept: returns the process, its
/// URL, and a task that ends with the first log line containing `needle`.
async fn serve_watching(
    spec: &str,
    needle: &'static str,
) -> (Proc, String, tokio::task::JoinHandle<String>) {
    let mut child = kvrouter()
        .args(["serve", "--http-host", "127.0.0.1", "--http-port", "0"])
        .args(["--router-mode", "kv", "--kv-cache-block-size", "16"])
        .args(["--engine", spec])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let url = banner_url(child.stdout.take().unwrap()).await;
    let log = tokio::task::spawn_blocking(move || {
        let mut r = std::io::BufReader::new(stderr);
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line.contains(needle) {
                return line;
            }
            line.clear();
        }
        line
    });
    (Proc(child), url, log)
}

/// `kvrouter serve` over engines; returns its URL.
async fn serve(engines: &[&Engine], extra: &[&str]) -> (Proc, String) {
    let mut cmd = kvrouter();
    cmd.args(["serve", "--http-host", "127.0.0.1", "--http-port", "0"])
        .args([
            "--router-mode",
            "kv",
            "--kv-cache-block-size",
            &BS.to_string(),
        ])
        .args(extra);
    for e in engines {
        cmd.args(["--engine", &e.spec()]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = banner_url(child.stdout.take().unwrap()).await;
    (Proc(child), url)
}

/// A chat request whose system prompt is shared by `family`.
fn chat(family: usize, question: &str, extra: Value) -> Value {
    let system = format!(
        "Family {family}: you are a careful assistant for the kvrouter project. {}",
        "Answer precisely, cite the module, and keep every reply short and useful. ".repeat(6)
    );
    let mut body = json!({
        "model": "mock-model", "max_tokens": 4,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    body
}

struct Answer {
    worker: String,
    rank: String,
    overlap: u32,
    cached: u64,
}

async fn ask(client: &reqwest::Client, url: &str, body: &Value) -> Answer {
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = |k: &str| r.headers().get(k).unwrap().to_str().unwrap().to_string();
    let worker = h("x-kvrouter-worker-id");
    let rank = h("x-kvrouter-dp-rank");
    let overlap = h("x-kvrouter-overlap-blocks").parse().unwrap();
    let body: Value = r.json().await.unwrap();
    let cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    Answer {
        worker,
        rank,
        overlap,
        cached,
    }
}

async fn state(client: &reqwest::Client, url: &str) -> Value {
    client
        .get(format!("{url}/router/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Blocks indexed per worker, sorted by worker id.
async fn indexed(client: &reqwest::Client, url: &str) -> Vec<(String, u64)> {
    let s = state(client, url).await;
    let mut v: Vec<(String, u64)> = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["worker_id"].to_string(),
                w["indexed_blocks"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Waits until the router indexes blocks of `worker` (its engine's events arrived).
async fn wait_indexed(client: &reqwest::Client, url: &str, worker: &str, what: &str) {
    wait_until(what, 10, || {
        let (c, u, w) = (client.clone(), url.to_string(), worker.to_string());
        async move {
            indexed(&c, &u)
                .await
                .iter()
                .any(|(id, n)| *id == w && *n > 0)
        }
    })
    .await;
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn prefixes_follow_the_events_and_a_restarted_router_replays_them() {
    let mut engines: Vec<Engine> = (0..3).map(|_| Engine::new("20")).collect();
    for e in &mut engines {
        e.start().await;
    }
    let refs: Vec<&Engine> = engines.iter().collect();
    let (router, url) = serve(&refs, &[]).await;
    let client = reqwest::Client::new();
    // Each family's first request warms one engine; the rest follow it there.
    let mut seen = Vec::new();
    for family in 0..4 {
        let first = ask(&client, &url, &chat(family, "first question", json!({}))).await;
        assert_eq!(first.overlap, 0);
        // The engine's stored events reach the router before the next request.
        wait_indexed(&client, &url, &first.worker, "the family's blocks indexed").await;
        for q in ["second question", "third question"] {
            let a = ask(&client, &url, &chat(family, q, json!({}))).await;
            assert_eq!(a.worker, first.worker, "family {family} moved");
            assert!(a.overlap >= 3, "family {family}: overlap {}", a.overlap);
            assert_eq!(
                a.cached,
                u64::from(a.overlap * BS),
                "the engine's cached tokens equal the router's predicted overlap"
            );
            seen.push((family, q, a.worker, a.overlap));
        }
    }
    // What the router answers now, once the engines' events have settled.
    let mut expect = Vec::new();
    for family in 0..4 {
        let a = ask(&client, &url, &chat(family, "second question", json!({}))).await;
        expect.push((family, a.worker, a.overlap));
    }
    let mut before = indexed(&client, &url).await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = indexed(&client, &url).await;
        if now == before {
            break;
        }
        before = now;
    }
    // A new router process: it rebuilds the index from the engines' replay buffers.
    drop(router);
    let (_router, url) = serve(&refs, &[]).await;
    wait_until("the index replayed", 10, || {
        let (c, u, b) = (client.clone(), url.clone(), before.clone());
        async move { indexed(&c, &u).await == b }
    })
    .await;
    assert_eq!(seen.len(), 8);
    for (family, worker, overlap) in expect {
        let a = ask(&client, &url, &chat(family, "second question", json!({}))).await;
        assert_eq!(
            (a.worker, a.overlap),
            (worker, overlap),
            "family {family} after the restart"
        );
    }
}

/// One engine publishes events, the other none: the silent one is routed
/// approximately, its families kept together by predicted caches.
#[tokio::test]
async fn an_engine_without_events_is_routed_approximately() {
    let mut engines = vec![Engine::new("20"), Engine::silent("20")];
    for e in &mut engines {
        e.start().await;
    }
    let refs: Vec<&Engine> = engines.iter().collect();
    let (_router, url) = serve(&refs, &[]).await;
    let client = reqwest::Client::new();
    let silent_url = engines[1].url();
    let mut on_silent = 0;
    for family in 10..16 {
        let first = ask(&client, &url, &chat(family, "one", json!({}))).await;
        let silent = engine_url(&client, &url, &first.worker).await == silent_url;
        if !silent {
            // The other engine's events must land before its next request.
            wait_indexed(&client, &url, &first.worker, "blocks indexed").await;
        }
        let again = ask(&client, &url, &chat(family, "two", json!({}))).await;
        assert_eq!(again.worker, first.worker, "family {family} moved");
        assert!(
            again.overlap >= 3,
            "family {family}: overlap {}",
            again.overlap
        );
        if silent {
            on_silent += 1;
            // The prediction was right: the engine itself reports the prefix cached.
            assert_eq!(again.cached, u64::from(again.overlap * BS));
        }
    }
    assert!(on_silent > 0, "no family went to the engine without events");
}

#[tokio::test]
async fn a_restarted_engine_is_cleared_and_rebuilt() {
    let mut engines: Vec<Engine> = (0..2).map(|_| Engine::fixed("20")).collect();
    for e in &mut engines {
        e.start().await;
    }
    let refs: Vec<&Engine> = engines.iter().collect();
    let (_router, url) = serve(&refs, &[]).await;
    let client = reqwest::Client::new();
    let first = ask(&client, &url, &chat(7, "q1", json!({}))).await;
    wait_indexed(&client, &url, &first.worker, "blocks indexed").await;
    // Restart the engine that holds the family, on the same ports.
    let idx = indexed(&client, &url)
        .await
        .iter()
        .position(|(id, n)| *id == first.worker && *n > 0)
        .unwrap();
    let target_url = engine_url(&client, &url, &first.worker).await;
    let e = engines.iter_mut().find(|e| e.url() == target_url).unwrap();
    e.kill();
    e.start().await;
    wait_until("the restarted engine's blocks cleared", 10, || {
        let (c, u) = (client.clone(), url.clone());
        async move { indexed(&c, &u).await[idx].1 == 0 }
    })
    .await;
    // The engine is back in routing and its cache is rebuilt from new events.
    wait_until("engine healthy again", 10, || {
        let (c, u) = (client.clone(), url.clone());
        async move { instances(&c, &u).await.iter().all(|i| i["healthy"] == true) }
    })
    .await;
    let again = ask(&client, &url, &chat(8, "fresh family", json!({}))).await;
    wait_indexed(&client, &url, &again.worker, "new blocks indexed").await;
}

#[tokio::test]
async fn a_killed_engine_ends_the_stream_cleanly_and_leaves_routing() {
    // Slow engines, so the stream is still running when its engine dies.
    let mut engines: Vec<Engine> = (0..2).map(|_| Engine::new("1")).collect();
    for e in &mut engines {
        e.start().await;
    }
    let refs: Vec<&Engine> = engines.iter().collect();
    let (_router, url) = serve(&refs, &[]).await;
    let client = reqwest::Client::new();
    let body = chat(
        3,
        "a long answer please",
        json!({"stream": true, "max_tokens": 2000, "ignore_eos": true}),
    );
    let mut resp = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let worker = resp.headers()["x-kvrouter-worker-id"]
        .to_str()
        .unwrap()
        .to_string();
    let mut text = String::new();
    while !text.contains("\"content\"") || text.matches("data:").count() < 3 {
        let chunk = resp.chunk().await.unwrap().expect("stream open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let target = engine_url(&client, &url, &worker).await;
    let killed_at = Instant::now();
    engines
        .iter_mut()
        .find(|e| e.url() == target)
        .unwrap()
        .kill();
    // The client's stream ends with an error event and [DONE], never a hang or a cut.
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        let mut rest = String::new();
        while let Some(chunk) = resp.chunk().await.unwrap() {
            rest.push_str(&String::from_utf8_lossy(&chunk));
        }
        rest
    })
    .await
    .expect("the stream ended");
    assert!(rest.contains("\"error\""), "no error event: {rest:?}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest:?}");
    // Out of routing within 2 s; requests go to the other engine.
    wait_until("the engine out of routing", 2, || {
        let (c, u, w) = (client.clone(), url.clone(), worker.clone());
        async move {
            instances(&c, &u)
                .await
                .iter()
                .any(|i| id_of(i) == w && i["healthy"] == false)
        }
    })
    .await;
    assert!(killed_at.elapsed() < Duration::from_secs(2));
    for i in 0..4 {
        let a = ask(&client, &url, &chat(3, &format!("after {i}"), json!({}))).await;
        assert_ne!(a.worker, worker);
    }
}

#[tokio::test]
async fn an_engines_400_reaches_the_client_unchanged() {
    let mut e = Engine::new("20");
    e.start().await;
    let (_router, url) = serve(&[&e], &[]).await;
    let client = reqwest::Client::new();
    let bad = json!({"model": "mock-model", "max_tokens": -3, "prompt": "hi"});
    let direct = client
        .post(format!("{}/v1/completions", e.url()))
        .json(&bad)
        .send()
        .await
        .unwrap();
    let (ds, db) = (direct.status(), direct.text().await.unwrap());
    let routed = client
        .post(format!("{url}/v1/completions"))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(routed.status(), ds);
    assert_eq!(ds, 400);
    assert_eq!(routed.text().await.unwrap(), db);
    // Fields the router does not read still reach the engine as written.
    let ok = json!({"model": "mock-model", "max_tokens": 2, "prompt": "hi", "user": "someone"});
    let r = client
        .post(format!("{url}/v1/completions"))
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The engines as the router's `/health` lists them.
async fn instances(client: &reqwest::Client, url: &str) -> Vec<Value> {
    let h: Value = client
        .get(format!("{url}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    h["instances"].as_array().unwrap().clone()
}

/// The URL of the engine the router knows as `worker`.
async fn engine_url(client: &reqwest::Client, url: &str, worker: &str) -> String {
    instances(client, url)
        .await
        .iter()
        .find(|i| id_of(i) == worker)
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A worker id from `/health` or `/router/state`, as the response headers write it.
fn id_of(v: &Value) -> String {
    v["worker_id"].as_u64().unwrap().to_string()
}

/// Engines serving different models are a start-up error naming each.
#[tokio::test]
async fn engines_that_disagree_on_the_model_stop_start_up() {
    let mut a = Engine::new("20").with(&["--model-name", "alpha"]);
    let mut b = Engine::new("20").with(&["--model-name", "beta"]);
    a.start().await;
    b.start().await;
    let out = kvrouter()
        .args(["serve", "--http-host", "127.0.0.1", "--http-port", "0"])
        .args(["--engine", &a.spec(), "--engine", &b.spec()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for word in ["alpha", "beta", &a.url(), &b.url()] {
        assert!(err.contains(word), "{word:?} not in {err}");
    }
}

/// An engine whose blocks are not the router's size: reported, counted, never indexed.
#[tokio::test]
async fn a_foreign_block_size_is_reported_and_counted() {
    let mut e = Engine::new("20");
    e.block_size = 32;
    e.start().await;
    let (_router, url, log) = serve_watching(&e.spec(), "router_block_size").await;
    let client = reqwest::Client::new();
    let a = ask(&client, &url, &chat(1, "q", json!({}))).await;
    assert_eq!(a.overlap, 0);
    let text = tokio::time::timeout(Duration::from_secs(10), log)
        .await
        .unwrap()
        .unwrap();
    assert!(
        text.contains("engine_block_size=32") && text.contains("router_block_size=16"),
        "{text}"
    );
    wait_until("the dropped blocks counted", 10, || {
        let (c, u) = (client.clone(), url.clone());
        async move {
            let m = c
                .get(format!("{u}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            m.lines().any(|l| {
                l.starts_with("kvrouter_engine_kv_blocks_dropped_total")
                    && l.contains("reason=\"block_size\"")
                    && !l.ends_with(" 0")
            })
        }
    })
    .await;
    assert_eq!(state(&client, &url).await["indexed_blocks"], 0);
}

/// Events configured but never arriving (here: nothing publishes on the
/// port given) are reported after 20 completed requests, naming the engine.
#[tokio::test]
async fn an_engine_whose_events_never_arrive_is_reported() {
    let mut e = Engine::silent("20");
    e.start().await;
    let spec = format!("{},kv-events=tcp://127.0.0.1:{}", e.url(), free_port());
    let (_router, url, log) = serve_watching(&spec, "no KV events from this engine").await;
    let client = reqwest::Client::new();
    for i in 0..20 {
        ask(&client, &url, &chat(i, "q", json!({}))).await;
    }
    let line = tokio::time::timeout(Duration::from_secs(10), log)
        .await
        .expect("reported")
        .unwrap();
    assert!(
        line.contains(&e.url()) && line.contains("kv-events-config"),
        "{line}"
    );
}

/// A data-parallel engine: each rank's events on its own port (discovered),
/// requests pinned to a rank with vLLM's header, families kept on their rank.
#[tokio::test]
async fn data_parallel_ranks_are_routed_and_pinned() {
    let mut e = Engine::new("20").with(&["--data-parallel-size", "2"]);
    e.start().await;
    let (_router, url) = serve(&[&e], &[]).await;
    let client = reqwest::Client::new();
    let ranks = state(&client, &url).await["workers"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(ranks, 2, "both ranks discovered");
    let mut used = std::collections::BTreeSet::new();
    for family in 20..24 {
        let first = ask(&client, &url, &chat(family, "one", json!({}))).await;
        let rank = first.rank.clone();
        wait_until("the rank's blocks indexed", 10, || {
            let (c, u, r) = (client.clone(), url.clone(), rank.clone());
            async move {
                state(&c, &u).await["workers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|w| {
                        w["dp_rank"].as_u64().map(|d| d.to_string()) == Some(r.clone())
                            && w["indexed_blocks"].as_u64() > Some(0)
                    })
            }
        })
        .await;
        let again = ask(&client, &url, &chat(family, "two", json!({}))).await;
        assert_eq!(again.rank, first.rank, "family {family} changed rank");
        assert_eq!(
            again.cached,
            u64::from(again.overlap * BS),
            "the pinned rank held the prefix"
        );
        used.insert(first.rank);
    }
    assert_eq!(used.len(), 2, "both ranks served families");
}
