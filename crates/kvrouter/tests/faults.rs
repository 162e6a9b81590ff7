//! Faults an operator meets, on the distributed mode over real etcd and NATS
//! (`make faults`; ignored by a plain `cargo test`). Each test asserts what
//! the operator cares about: no request hangs, no stream is cut without an
//! error event, and requests that arrive after the fault are served.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Fleet, printed_url};
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::json;

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    /// `data: [DONE]`.
    Done,
    /// An error the client can read: an error status, or an error event in the stream.
    Error,
    /// The stream stopped with neither.
    Cut,
    /// No end within the bound.
    Hung,
}

async fn one_stream(client: &reqwest::Client, url: &str) -> End {
    stream_of(client, url, 30).await
}

/// One streaming chat completion of `tokens` tokens.
async fn stream_of(client: &reqwest::Client, url: &str, tokens: u32) -> End {
    let req = client
        .post(format!("{url}/v1/chat/completions"))
        .json(
            &json!({"model": "mock-model", "max_tokens": tokens, "ignore_eos": true, "stream": true,
                      "messages": [{"role": "user", "content": "stream me something"}]}),
        )
        .send();
    let run = async {
        let r = match req.await {
            Ok(r) => r,
            Err(_) => return End::Cut,
        };
        if !r.status().is_success() {
            return End::Error;
        }
        let mut text = String::new();
        let mut body = r.bytes_stream();
        while let Some(c) = body.next().await {
            match c {
                Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
                Err(_) => return End::Cut,
            }
        }
        if text.contains("data: [DONE]") {
            End::Done
        } else if text.contains("data: {\"error\"") {
            End::Error
        } else {
            End::Cut
        }
    };
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .unwrap_or(End::Hung)
}

/// A fleet of `workers` mocker processes (one worker each, so one can be
/// stopped alone) behind a round-robin frontend; returns it and its URL once
/// every worker is routable.
fn fleet(workers: usize, frontend_args: &[&str]) -> (Fleet, String) {
    let mut f = Fleet::start();
    for _ in 0..workers {
        f.spawn(&[
            "mocker",
            "--endpoint",
            "faults.backend.generate",
            "--num-workers",
            "1",
            "--speedup-ratio",
            "10",
            "--namespace",
            "faults",
        ]);
    }
    let mut args = vec![
        "frontend",
        "--namespace",
        "faults",
        "--router-mode",
        "round-robin",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        "0",
        "--model-name",
        "mock-model",
    ];
    args.extend_from_slice(frontend_args);
    let mut frontend = f
        .cmd(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = printed_url(&mut frontend);
    f.children.push(frontend);
    (f, url)
}

/// Polls the frontend's metrics until it routes to `n` workers.
async fn until_workers(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    within: Duration,
) -> Duration {
    let t0 = Instant::now();
    let want = format!("dynamo_frontend_model_workers{{model=\"mock-model\"}} {n}");
    loop {
        if let Ok(r) = client.get(format!("{url}/metrics")).send().await
            && let Ok(m) = r.text().await
            && m.contains(&want)
        {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < within, "never {n} workers within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Results = Arc<Mutex<Vec<(Instant, End)>>>;

/// Eight clients streaming `tokens`-token answers back to back until `stop_at`.
fn streaming_clients(
    client: &reqwest::Client,
    url: &str,
    stop_at: Instant,
    tokens: u32,
) -> (Results, Vec<tokio::task::JoinHandle<()>>) {
    let results: Results = Arc::default();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (client, url, results) = (client.clone(), url.to_string(), results.clone());
        clients.push(tokio::spawn(async move {
            while Instant::now() < stop_at {
                let started = Instant::now();
                let end = stream_of(&client, &url, tokens).await;
                results.lock().push((started, end));
            }
        }));
    }
    (results, clients)
}

/// Waits for three routable workers, then runs eight streaming clients
/// (`tokens`-token answers) for 4.5 s; returns 1.5 s in, when the fault goes in.
async fn load_with_fault_at_1_5s(
    client: &reqwest::Client,
    url: &str,
    tokens: u32,
) -> (Results, Vec<tokio::task::JoinHandle<()>>) {
    until_workers(client, url, 3, Duration::from_secs(20)).await;
    let running = streaming_clients(
        client,
        url,
        Instant::now() + Duration::from_millis(4500),
        tokens,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running
}

/// Waits for the clients to stop; every request's start and end.
async fn ends(running: (Results, Vec<tokio::task::JoinHandle<()>>)) -> Vec<(Instant, End)> {
    for c in running.1 {
        c.await.unwrap();
    }
    running.0.lock().clone()
}

/// `kill -9` of fleet process `i`.
fn kill(f: &mut Fleet, i: usize) {
    f.children[i].kill().unwrap();
    f.children[i].wait().unwrap();
}

fn count(results: &[(Instant, End)], end: End) -> usize {
    results.iter().filter(|r| r.1 == end).count()
}

fn summary(results: &[(Instant, End)]) -> String {
    format!(
        "{} requests, {} done, {} errors, {} cut, {} hung",
        results.len(),
        count(results, End::Done),
        count(results, End::Error),
        count(results, End::Cut),
        count(results, End::Hung),
    )
}

#[test]
#[ignore = "fault suite: make faults"]
fn a_worker_killed_under_streaming_load_hangs_nothing_and_leaves_routing_at_once() {
    let (mut f, url) = fleet(3, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let running = load_with_fault_at_1_5s(&client, &url, 30).await;
        let killed_at = Instant::now();
        kill(&mut f, 0);
        let results = ends(running).await;
        let after: Vec<End> = results
            .iter()
            .filter(|(t, _)| *t > killed_at)
            .map(|r| r.1)
            .collect();
        println!(
            "worker kill -9: {}; {} started after the kill",
            summary(&results),
            after.len()
        );
        assert_eq!(count(&results, End::Hung), 0, "hung requests: {results:?}");
        assert_eq!(
            count(&results, End::Cut),
            0,
            "streams cut without an error event"
        );
        assert!(
            after.len() >= 20,
            "too few requests after the kill: {}",
            after.len()
        );
        // Retried before their first byte, away from the dead worker: every one served.
        assert!(
            after.iter().all(|e| *e == End::Done),
            "requests sent after the kill failed: {after:?}"
        );
    });
}

#[test]
#[ignore = "fault suite: make faults"]
fn a_worker_stopped_with_sigterm_leaves_discovery_first_and_finishes_its_streams() {
    let (mut f, url) = fleet(3, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let running = load_with_fault_at_1_5s(&client, &url, 30).await;
        let pid = f.children[0].id().to_string();
        let stopped = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(stopped.success());
        // Out of routing at once, not when its lease would expire (10 s).
        let left = until_workers(&client, &url, 2, Duration::from_secs(3)).await;
        let results = ends(running).await;
        let exit = tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let status = f.children[0].wait().unwrap();
            (status, t0.elapsed(), f)
        })
        .await
        .unwrap();
        println!(
            "worker SIGTERM: out of routing after {left:?}; {}; exit {:?}",
            summary(&results),
            exit.0,
        );
        assert!(exit.0.success(), "a graceful stop exits 0: {:?}", exit.0);
        // Its streams finished on it; new ones went to the others: nothing failed.
        assert_eq!(count(&results, End::Done), results.len(), "{results:?}");
    });
}

#[test]
#[ignore = "fault suite: make faults"]
fn a_fleet_heals_when_etcd_is_replaced_by_an_empty_server() {
    let (mut f, url) = fleet(2, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        until_workers(&client, &url, 2, Duration::from_secs(20)).await;
        assert_eq!(one_stream(&client, &url).await, End::Done);
        // Every lease and registration is gone; the processes run on.
        let replaced_at = Instant::now();
        f.etcd.replace().expect("an empty etcd on the same ports");
        // The workers' keepers find their leases gone and register again.
        let store = kvrouter_runtime::discovery::EtcdDiscovery::connect(&[f.etcd.endpoint()])
            .await
            .unwrap();
        let ep: kvrouter_runtime::endpoint::EndpointId = "faults.backend.generate".parse().unwrap();
        use kvrouter_runtime::discovery::Discovery;
        loop {
            if store.list(&ep).await.map(|v| v.len()).unwrap_or(0) == 2 {
                break;
            }
            assert!(replaced_at.elapsed() < Duration::from_secs(20), "the workers never registered again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let registered = replaced_at.elapsed();
        // The frontend's watch resyncs from the new server and follows them.
        tokio::time::sleep(Duration::from_secs(1)).await;
        until_workers(&client, &url, 2, Duration::from_secs(10)).await;
        let healed = replaced_at.elapsed();
        let mut ends = Vec::new();
        for _ in 0..10 {
            ends.push(one_stream(&client, &url).await);
        }
        println!("etcd replaced by an empty server: workers registered again after {registered:?}, routable (checked after a 1 s settle) by {healed:?}; 10 requests: {ends:?}");
        assert!(ends.iter().all(|e| *e == End::Done), "{ends:?}");
    });
}

#[test]
#[ignore = "fault suite: make faults"]
fn with_migration_a_worker_killed_mid_stream_costs_no_stream() {
    let (mut f, url) = fleet(3, &["--migration-limit", "2"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        // Long answers (about a second each): the victim is mid-stream when it dies.
        let running = load_with_fault_at_1_5s(&client, &url, 600).await;
        kill(&mut f, 0);
        let results = ends(running).await;
        let m = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let moved = m
            .lines()
            .find(|l| {
                l.starts_with(
                    "dynamo_frontend_model_migration_total{migration_type=\"ongoing_request\"}",
                )
            })
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("0")
            .to_string();
        println!(
            "worker kill -9 with --migration-limit 2: {}; {moved} streams migrated",
            summary(&results)
        );
        assert!(
            moved.parse::<u64>().unwrap_or(0) >= 1,
            "no stream was in flight on the victim"
        );
        // The streams in flight on the killed worker moved: every one completed.
        assert_eq!(count(&results, End::Done), results.len(), "{results:?}");
    });
}

#[test]
#[ignore = "fault suite: make faults"]
fn services_stopped_with_sigterm_leave_discovery_at_once() {
    use kvrouter_runtime::discovery::{Discovery, EtcdDiscovery};
    let mut f = Fleet::start();
    f.spawn(&[
        "mocker",
        "--endpoint",
        "stop.backend.generate",
        "--namespace",
        "stop",
    ]);
    f.spawn(&[
        "router",
        "--endpoint",
        "stop.backend.generate",
        "--block-size",
        "64",
        "--namespace",
        "stop",
    ]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = EtcdDiscovery::connect(&[f.etcd.endpoint()]).await.unwrap();
        let listed = |ep: &'static str| {
            let store = store.clone();
            async move {
                let ep: kvrouter_runtime::endpoint::EndpointId = ep.parse().unwrap();
                store.list(&ep).await.map(|v| v.len()).unwrap_or(0)
            }
        };
        let t0 = Instant::now();
        while listed("stop.router.generate").await == 0
            || listed("stop.backend.generate").await == 0
        {
            assert!(t0.elapsed() < Duration::from_secs(20), "never registered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (i, ep) in [(1, "stop.router.generate"), (0, "stop.backend.generate")] {
            let pid = f.children[i].id().to_string();
            let t = Instant::now();
            assert!(
                std::process::Command::new("kill")
                    .args(["-TERM", &pid])
                    .status()
                    .unwrap()
                    .success()
            );
            while listed(ep).await > 0 {
                assert!(
                    t.elapsed() < Duration::from_secs(3),
                    "{ep} still registered (its lease is 10 s)"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let left = t.elapsed();
            let status = f.children[i].wait().unwrap();
            println!("SIGTERM: {ep} left discovery after {left:?}, exit {status:?}");
            assert!(status.success());
        }
    });
}
