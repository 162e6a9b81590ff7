//! The HTTP edge and shutdown, tried as an operator would: a real `kvrouter
//! serve` process, raw sockets for the clients that misbehave, and SIGTERM
//! sent by `kill`. What is asserted is what matters to the operator: every
//! answer the server itself makes is OpenAI error JSON, a slow client costs a
//! bounded time, and no stream is cut without an error event.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Starts `kvrouter serve` on a free port with `extra` flags; returns it and its URL.
async fn serve(extra: &[&str]) -> (Child, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvrouter"));
    for (k, _) in std::env::vars() {
        if k.starts_with("DYN_") {
            c.env_remove(k);
        }
    }
    let mut child = c
        .args([
            "serve",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--workers",
            "2",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    })
    .await
    .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (child, url)
}

fn addr(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// Sends `raw` on a new connection and reads until the server closes it (or `within` passes).
async fn raw(url: &str, raw: &[u8], within: Duration) -> (String, Duration) {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr(url)).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
}

/// The status and JSON body of a raw HTTP/1.1 answer.
fn parse(answer: &str) -> (u16, Value) {
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    let v = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {answer:?}"));
    (status, v)
}

fn assert_openai_error(v: &Value, what: &str) {
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
            && v["error"]["type"].is_string(),
        "{what}: not an OpenAI error: {v}"
    );
}

#[tokio::test]
async fn slow_oversized_and_malformed_requests_get_openai_errors() {
    let (mut child, url) = serve(&[
        "--http-header-timeout",
        "1",
        "--http-body-timeout",
        "1",
        "--http-max-body-bytes",
        "1000",
        "--http-max-connections",
        "8",
    ])
    .await;
    let t0 = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();

    // Headers that never end: the connection is closed after the header timeout.
    let (_, took) = raw(
        &url,
        b"GET /live HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(took < Duration::from_secs(3), "slow headers held {took:?}");

    // A body shorter than its Content-Length: 408 after the body timeout.
    let (a, took) = raw(
        &url,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"",
        Duration::from_secs(5),
    )
    .await;
    let (status, v) = parse(&a);
    assert_eq!(status, 408, "{a}");
    assert_openai_error(&v, "slow body");
    assert!(took < Duration::from_secs(3), "slow body held {took:?}");

    // A malformed chunked body: 400.
    let (a, _) = raw(
        &url,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let (status, v) = parse(&a);
    assert_eq!(status, 400, "{a}");
    assert_openai_error(&v, "bad chunked body");

    let client = reqwest::Client::new();
    let check = |r: reqwest::Response, want: u16, what: &'static str| async move {
        assert_eq!(r.status().as_u16(), want, "{what}");
        let v: Value = r
            .json()
            .await
            .unwrap_or_else(|_| panic!("{what}: not JSON"));
        assert_openai_error(&v, what);
    };
    // Too large, declared and chunked.
    let big = json!({"model": "mock-model", "prompt": "x".repeat(2000)});
    check(
        client
            .post(format!("{url}/v1/completions"))
            .json(&big)
            .send()
            .await
            .unwrap(),
        413,
        "declared too large",
    )
    .await;
    let chunks = futures::stream::iter(vec![
        Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 800])),
        Ok(bytes::Bytes::from(vec![b' '; 800])),
    ]);
    check(
        client
            .post(format!("{url}/v1/completions"))
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap(),
        413,
        "chunked too large",
    )
    .await;
    // The framework's own answers: wrong method, long target, large headers.
    check(
        client
            .get(format!("{url}/v1/chat/completions"))
            .send()
            .await
            .unwrap(),
        405,
        "method",
    )
    .await;
    check(
        client
            .get(format!("{url}/live?{}", "q".repeat(9000)))
            .send()
            .await
            .unwrap(),
        414,
        "target",
    )
    .await;
    check(
        client
            .get(format!("{url}/live"))
            .header("x-big", "h".repeat(70_000))
            .send()
            .await
            .unwrap(),
        431,
        "headers",
    )
    .await;

    // Each response has its own `created`, not the server's start time.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let v: Value = client
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": "mock-model", "prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["created"].as_u64().unwrap() > t0, "{v}");

    // Past the connection limit: 503, while the connections held stay served.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(addr(&url)).await.unwrap());
    }
    let (a, _) = raw(
        &url,
        b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    let (status, v) = parse(&a);
    assert_eq!(status, 503, "{a}");
    assert_openai_error(&v, "connection limit");
    held[0]
        .write_all(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    held[0].read_to_end(&mut out).await.unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    drop(held);

    child.kill().unwrap();
    child.wait().unwrap();
}

/// How a stream ended.
#[derive(Debug, PartialEq)]
enum End {
    Done,
    Error,
    Cut,
}

async fn stream(client: reqwest::Client, url: String, max_tokens: u32) -> End {
    let r = client
        .post(format!("{url}/v1/completions"))
        .json(
            &json!({"model": "mock-model", "prompt": "tell me a story", "max_tokens": max_tokens,
                      "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
            Err(_) => return End::Cut,
        }
    }
    if text.contains("data: [DONE]") {
        End::Done
    } else if text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .any(|v| v["error"]["message"].is_string())
    {
        End::Error
    } else {
        End::Cut
    }
}

#[tokio::test]
async fn sigterm_drains_short_streams_and_ends_long_ones_with_an_error() {
    let grace = 2.0;
    let (mut child, url) =
        serve(&["--graceful-shutdown-timeout", "2", "--speedup-ratio", "1"]).await;
    let client = reqwest::Client::new();
    // Short streams finish inside the grace period; long ones cannot.
    let mut short = Vec::new();
    let mut long = Vec::new();
    for _ in 0..10 {
        short.push(tokio::spawn(stream(client.clone(), url.clone(), 20)));
        long.push(tokio::spawn(stream(client.clone(), url.clone(), 20_000)));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    // New connections are refused once the server stops accepting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        TcpStream::connect(addr(&url)).await.is_err(),
        "still accepting after SIGTERM"
    );
    for s in short {
        assert_eq!(s.await.unwrap(), End::Done, "a short stream did not finish");
    }
    for s in long {
        assert_eq!(
            s.await.unwrap(),
            End::Error,
            "a long stream was not ended with an error event"
        );
    }
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let took = signalled.elapsed().as_secs_f64();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took >= grace - 0.2 && took < grace + 6.0,
        "exited {took} s after SIGTERM"
    );
}

#[tokio::test]
async fn slow_requests_end_with_timeout_errors() {
    // A slow first token: prefill of a long prompt at a hundredth of real speed.
    let (mut slow, url) = serve(&["--speedup-ratio", "0.01", "--ttft-timeout", "300ms"]).await;
    let client = reqwest::Client::new();
    let t = Instant::now();
    let r = client
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": "mock-model", "prompt": "word ".repeat(3000), "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 504);
    let v: Value = r.json().await.unwrap();
    assert_openai_error(&v, "ttft");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--ttft-timeout"),
        "{v}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    slow.kill().unwrap();
    slow.wait().unwrap();

    // A long answer: the stream ends with an error event, a unary request gets 504.
    let (mut child, url) = serve(&["--speedup-ratio", "1", "--request-timeout", "1"]).await;
    let t = Instant::now();
    let end = stream(client.clone(), url.clone(), 20_000).await;
    assert_eq!(end, End::Error);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let r = client
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": "mock-model", "prompt": "hi", "max_tokens": 20_000, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 504);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--request-timeout"),
        "{v}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn what_kvrouter_cannot_honour_is_refused_by_name() {
    let (mut child, url) = serve(&[]).await;
    let client = reqwest::Client::new();
    let chat = |extra: Value| {
        let mut b = json!({"model": "mock-model", "max_tokens": 2,
                           "messages": [{"role": "user", "content": "hi"}]});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let completion = |extra: Value| {
        let mut b = json!({"model": "mock-model", "max_tokens": 2, "prompt": "hi"});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let cases = [
        (
            "chat/completions",
            chat(json!({"logprobs": true})),
            "logprobs",
        ),
        (
            "chat/completions",
            chat(json!({"top_logprobs": 3})),
            "top_logprobs",
        ),
        ("completions", completion(json!({"echo": true})), "echo"),
        ("completions", completion(json!({"best_of": 3})), "best_of"),
        (
            "completions",
            completion(json!({"logprobs": 2})),
            "logprobs",
        ),
        (
            "chat/completions",
            chat(json!({"response_format": {"type": "json_object"}})),
            "response_format",
        ),
        (
            "chat/completions",
            chat(
                json!({"tools": [{"type": "function", "function": {"name": "get_weather"}}],
                        "tool_choice": {"type": "function", "function": {"name": "book_flight"}}}),
            ),
            "tool_choice",
        ),
        (
            "completions",
            json!({"model": "mock-model", "prompt": [1, 2, 999_999_999]}),
            "prompt",
        ),
        (
            "completions",
            completion(json!({"nvext": {"backend_instance_id": 12345}})),
            "nvext",
        ),
    ];
    for (path, body, param) in cases {
        let r = client
            .post(format!("{url}/v1/{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{param}: {body}");
        let v: Value = r.json().await.unwrap();
        assert_openai_error(&v, param);
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // The off values of the same fields are fine.
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat(
            json!({"logprobs": false, "response_format": {"type": "text"}}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // A prompt too long for the context whatever its tokens: refused before tokenizing.
    let t = Instant::now();
    let r = client
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": "mock-model", "prompt": "a".repeat(6_000_000)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_length_sets_the_longest_prompt_served() {
    let (mut child, url) = serve(&["--context-length", "64"]).await;
    let client = reqwest::Client::new();
    let send = |words: usize| {
        let body = json!({"model": "mock-model", "max_tokens": 4,
                          "prompt": vec!["word"; words].join(" ")});
        client
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .send()
    };
    // Well inside 64 tokens, then well past them.
    let r = send(10).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = send(200).await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_tokens_disconnects_context_length_and_uptime_are_exposed() {
    let (mut child, url) = serve(&["--context-length", "1000"]).await;
    let client = reqwest::Client::new();
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    // One complete answer of 5 tokens.
    let body = json!({"model": "mock-model", "max_tokens": 5, "ignore_eos": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.bytes().await.unwrap();
    // A long stream the client abandons after its first chunk.
    let body = json!({"model": "mock-model", "max_tokens": 900, "ignore_eos": true, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let mut r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    r.chunk().await.unwrap();
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metric(&text, "dynamo_frontend_disconnected_clients{") >= 1.0
            || Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        metric(&text, "dynamo_frontend_disconnected_clients{"),
        1.0,
        "{text}"
    );
    assert!(metric(&text, "dynamo_frontend_output_tokens_total{") >= 5.0);
    assert_eq!(
        metric(&text, "dynamo_frontend_model_context_length{"),
        1000.0
    );
    assert!(metric(&text, "dynamo_component_uptime_seconds") > 0.0);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_is_split_from_content_in_answers_and_streams() {
    let script = "<think>two and two make four</think>It is 4.";
    let (mut child, url) = serve(&[
        "--dyn-reasoning-parser",
        "deepseek_r1",
        "--mock-response-text",
        script,
    ])
    .await;
    let client = reqwest::Client::new();
    let body = |stream: bool| {
        json!({"model": "mock-model", "max_tokens": 100, "stream": stream,
               "messages": [{"role": "user", "content": "what is two and two?"}]})
    };
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body(false))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let m = &v["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "two and two make four", "{v}");
    assert_eq!(m["content"], "It is 4.", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    // Streamed, token by token: markers cross chunk boundaries.
    let text = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body(true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (mut reasoning, mut content) = (String::new(), String::new());
    for line in text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
    {
        let v: Value = serde_json::from_str(line).unwrap();
        let d = &v["choices"][0]["delta"];
        reasoning.push_str(d["reasoning_content"].as_str().unwrap_or(""));
        content.push_str(d["content"].as_str().unwrap_or(""));
    }
    assert_eq!(reasoning, "two and two make four", "{text}");
    assert_eq!(content, "It is 4.", "{text}");
    child.kill().unwrap();
    child.wait().unwrap();
}
