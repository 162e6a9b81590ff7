//! The engines' own publishers — vLLM 0.21 and 0.33, SGLang 0.5.12 and
//! 0.5.23, their `kv_events.py` from the published wheels — driving the Rust
//! subscriber and replay client over loopback.
//!
//! Needs the unpacked wheel files and a Python with msgspec and pyzmq:
//! `make interop` downloads and prepares both, then runs these tests with
//! `KVROUTER_INTEROP=<dir>` and `KVROUTER_INTEROP_PYTHON=<python>`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvrouter_core::WorkerKey;
use kvrouter_core::hash::block_hashes;
use kvrouter_engines::metrics::EngineMetrics;
use kvrouter_engines::replay::replay;
use kvrouter_engines::source::{KvEventSource, ZmqSourceConfig};
use kvrouter_engines::wire::{EngineEvent, decode_batch};
use tokio_util::sync::CancellationToken;

const BS: usize = 4;
const BATCHES: usize = 20;

mod common;
use common::Index;

fn family(i: usize) -> Vec<u32> {
    (0..BS as u32).map(|t| i as u32 * 1000 + t).collect()
}

use common::free_port;

struct Publisher(Child);

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(engine: &str, root: &str, base: u16, replay_base: u16, rank: u32) -> Publisher {
    let python = std::env::var("KVROUTER_INTEROP_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tools/interop/engine_publisher.py"
    );
    let mut child = Command::new(python)
        .args([script, "--engine", engine, "--root", root])
        // A wildcard host makes the engines bind (a concrete one makes vLLM connect out).
        .args(["--endpoint", &format!("tcp://*:{base}")])
        .args(["--replay", &format!("tcp://*:{replay_base}")])
        .args([
            "--rank",
            &rank.to_string(),
            "--batches",
            &BATCHES.to_string(),
        ])
        .args(["--block-size", &BS.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "{engine} publisher did not start");
    // Keep reading so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    Publisher(child)
}

async fn check(engine: &str, version: &str) {
    let root =
        std::env::var("KVROUTER_INTEROP").expect("KVROUTER_INTEROP names the unpacked wheels");
    let dir = format!("{root}/{engine}-{version}");
    assert!(
        std::path::Path::new(&dir).is_dir(),
        "{dir} missing: run make interop"
    );
    let (base, replay_base, rank) = (free_port(), free_port(), 1);
    // The engine binds base + rank for both sockets, as vLLM and SGLang do.
    let endpoint = format!("tcp://127.0.0.1:{}", base + 1);
    let replay_ep = format!("tcp://127.0.0.1:{}", replay_base + 1);
    let key = WorkerKey::new(42, rank);
    let index = Arc::new(Index::default());
    let metrics = EngineMetrics::unregistered();
    let _publisher = spawn(engine, &dir, base, replay_base, rank);
    // Subscribing after the engine started: the first batches are only in its
    // replay buffer, so the source must join through a replay.
    let _source = KvEventSource::spawn_zmq(
        ZmqSourceConfig {
            key,
            endpoint: endpoint.clone(),
            replay_endpoint: Some(replay_ep.clone()),
            topic: String::new(),
            block_size: BS,
            replay_timeout: Duration::from_secs(3),
        },
        index.clone(),
        metrics.clone(),
        CancellationToken::new(),
    );
    let overlap = |i: usize| {
        index
            .0
            .lock()
            .find_matches(&block_hashes(&family(i), BS))
            .score(key)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(overlap(BATCHES - 1) == 1 && overlap(0) == 0) {
        assert!(
            Instant::now() < deadline,
            "{engine} {version}: events not followed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 1..BATCHES {
        assert_eq!(overlap(i), 1, "{engine} {version}: family {i}");
    }
    let labels = ["42", "1"];
    assert_eq!(
        metrics
            .undecodable
            .with_label_values(&[labels[0], labels[1], "bad_event"])
            .get(),
        0
    );
    // The replay client against the engine's own ROUTER: every batch, in order.
    let rep = replay(&replay_ep, 0, Duration::from_secs(3)).await.unwrap();
    assert!(rep.complete_from(0), "{engine} {version}: replay from 0");
    assert_eq!(rep.batches.len(), BATCHES + 1);
    for (seq, payload) in &rep.batches {
        let b = decode_batch(payload).unwrap();
        assert!(
            b.skipped.is_empty(),
            "{engine} {version} batch {seq}: {:?}",
            b.skipped
        );
        assert_eq!(
            b.dp_rank,
            Some(rank),
            "{engine} {version}: the batch carries its rank"
        );
        let expected_store = (*seq as usize) < BATCHES;
        assert_eq!(
            matches!(b.events[0], EngineEvent::Stored(_)),
            expected_store
        );
    }
    // Asking from the middle starts there.
    let rep = replay(&replay_ep, 7, Duration::from_secs(3)).await.unwrap();
    assert!(rep.complete_from(7));
    assert_eq!(rep.batches.len(), BATCHES + 1 - 7);
}

#[tokio::test]
#[ignore = "needs the engines' wheels: make interop"]
async fn vllm_0_21() {
    check("vllm", "0.21.0").await;
}

#[tokio::test]
#[ignore = "needs the engines' wheels: make interop"]
async fn vllm_0_33() {
    check("vllm", "0.33.0").await;
}

#[tokio::test]
#[ignore = "needs the engines' wheels: make interop"]
async fn sglang_0_5_12() {
    check("sglang", "0.5.12").await;
}

#[tokio::test]
#[ignore = "needs the engines' wheels: make interop"]
async fn sglang_0_5_23() {
    check("sglang", "0.5.23").await;
}
