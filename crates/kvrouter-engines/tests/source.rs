//! The ZeroMQ source against a vLLM-style publisher over real loopback
//! sockets: joining mid-stream, gaps repaired by replay, history gone,
//! no replay socket, engine restarts, garbage frames, a foreign block size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvrouter_core::WorkerKey;
use kvrouter_core::hash::{block_hashes, sequence_hashes};
use kvrouter_engines::metrics::EngineMetrics;
use kvrouter_engines::publisher::{EventFormat, ZmqKvPublisher};
use kvrouter_engines::source::{KvEventSource, ZmqSourceConfig};
use kvrouter_engines::wire::{BlockRemoved, BlockStored, EngineEvent};
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketSend};

const BS: usize = 4;
const W: WorkerKey = WorkerKey::new(7, 0);

mod common;
use common::Index;

impl Index {
    fn overlap(&self, tokens: &[u32]) -> u32 {
        let m = self.0.lock().find_matches(&block_hashes(tokens, BS));
        m.score(W)
    }
}

/// A prompt of `blocks` blocks, distinct per `family`.
fn prompt(family: u32, blocks: usize) -> Vec<u32> {
    (0..(blocks * BS) as u32)
        .map(|i| family * 1000 + i)
        .collect()
}

/// The engine's store of `tokens` (engine hashes = the rolling hashes).
fn store(tokens: &[u32], block_size: u32) -> EngineEvent {
    let seq = sequence_hashes(&block_hashes(tokens, block_size as usize));
    EngineEvent::Stored(BlockStored {
        block_hashes: seq.iter().map(|h| h.0 ^ 0xABCD).collect(),
        parent_block_hash: None,
        token_ids: tokens.to_vec(),
        block_size,
        medium: Some("GPU".into()),
        ..Default::default()
    })
}

fn remove(tokens: &[u32]) -> EngineEvent {
    let seq = sequence_hashes(&block_hashes(tokens, BS));
    EngineEvent::Removed(BlockRemoved {
        block_hashes: seq.iter().map(|h| h.0 ^ 0xABCD).collect(),
        ..Default::default()
    })
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Rig {
    publisher: ZmqKvPublisher,
    index: Arc<Index>,
    metrics: EngineMetrics,
    source: KvEventSource,
}

async fn rig(replay: bool, format: EventFormat) -> Rig {
    let publisher = ZmqKvPublisher::bind(
        "tcp://127.0.0.1:0",
        replay.then_some("tcp://127.0.0.1:0"),
        0,
        format,
    )
    .await
    .unwrap();
    let index = Arc::new(Index::default());
    let metrics = EngineMetrics::unregistered();
    let source = KvEventSource::spawn_zmq(
        ZmqSourceConfig {
            key: W,
            endpoint: publisher.address().to_string(),
            replay_endpoint: publisher.replay_address().map(str::to_string),
            topic: String::new(),
            block_size: BS,
            replay_timeout: Duration::from_secs(2),
        },
        index.clone(),
        metrics.clone(),
        CancellationToken::new(),
    );
    Rig {
        publisher,
        index,
        metrics,
        source,
    }
}

impl Rig {
    /// Publishes family 0 until the subscription is live (slow joiner).
    async fn warm_up(&mut self) {
        let p = prompt(0, 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.index.overlap(&p) == 0 {
            assert!(Instant::now() < deadline, "subscription never came up");
            self.publisher
                .publish(&[store(&p, BS as u32)])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    fn count(&self, family: &prometheus::IntCounterVec, label: &str) -> u64 {
        family.with_label_values(&["7", "0", label]).get()
    }
}

#[tokio::test]
async fn gaps_are_replayed_and_duplicates_skipped() {
    for format in [EventFormat::Map, EventFormat::Array] {
        let mut r = rig(true, format).await;
        r.warm_up().await;
        // Two batches never reach the subscriber, the third does: a gap.
        r.publisher.publish_lost(&[store(&prompt(1, 3), 4)]);
        r.publisher
            .publish_lost(&[store(&prompt(2, 2), 4), remove(&prompt(0, 1))]);
        r.publisher
            .publish(&[store(&prompt(3, 1), 4)])
            .await
            .unwrap();
        let idx = r.index.clone();
        wait_for("replayed blocks", || idx.overlap(&prompt(3, 1)) == 1).await;
        assert_eq!(r.index.overlap(&prompt(1, 3)), 3);
        assert_eq!(r.index.overlap(&prompt(2, 2)), 2);
        assert_eq!(
            r.index.overlap(&prompt(0, 1)),
            0,
            "the lost removal was replayed"
        );
        assert_eq!(
            r.metrics.gaps.with_label_values(&["7", "0"]).get(),
            1,
            "{format:?}"
        );
        assert!(r.count(&r.metrics.replays, "complete") >= 1);
        assert_eq!(r.count(&r.metrics.resets, "history_lost"), 0);
        // Live traffic continues after the replay.
        r.publisher
            .publish(&[store(&prompt(4, 2), 4)])
            .await
            .unwrap();
        let idx = r.index.clone();
        wait_for("live after replay", || idx.overlap(&prompt(4, 2)) == 2).await;
        r.source.stop().await;
    }
}

#[tokio::test]
async fn lost_history_clears_the_rank_and_rebuilds_it() {
    let mut r = rig(true, EventFormat::Map).await;
    r.publisher.set_buffer_steps(2);
    r.warm_up().await;
    r.publisher
        .publish(&[store(&prompt(1, 2), 4)])
        .await
        .unwrap();
    let idx = r.index.clone();
    wait_for("family 1", || idx.overlap(&prompt(1, 2)) == 2).await;
    // Five batches lost, only the last two are still buffered.
    for f in 10..15 {
        r.publisher.publish_lost(&[store(&prompt(f, 1), 4)]);
    }
    r.publisher
        .publish(&[store(&prompt(20, 1), 4)])
        .await
        .unwrap();
    let idx = r.index.clone();
    wait_for("rebuilt from live", || idx.overlap(&prompt(20, 1)) == 1).await;
    assert_eq!(r.count(&r.metrics.resets, "history_lost"), 1);
    assert!(r.count(&r.metrics.replays, "incomplete") >= 1);
    assert_eq!(
        r.index.overlap(&prompt(1, 2)),
        0,
        "stale blocks were cleared"
    );
}

#[tokio::test]
async fn without_replay_a_gap_clears_the_rank() {
    let mut r = rig(false, EventFormat::Map).await;
    r.warm_up().await;
    r.publisher.publish_lost(&[remove(&prompt(0, 1))]);
    r.publisher
        .publish(&[store(&prompt(5, 1), 4)])
        .await
        .unwrap();
    let idx = r.index.clone();
    wait_for("live after the gap", || idx.overlap(&prompt(5, 1)) == 1).await;
    assert!(r.count(&r.metrics.replays, "unavailable") >= 1);
    assert_eq!(r.count(&r.metrics.resets, "history_lost"), 1);
    assert_eq!(r.index.overlap(&prompt(0, 1)), 0);
}

#[tokio::test]
async fn an_engine_restart_clears_its_blocks() {
    let mut r = rig(true, EventFormat::Map).await;
    r.warm_up().await;
    for _ in 0..3 {
        r.publisher
            .publish(&[store(&prompt(1, 1), 4)])
            .await
            .unwrap();
    }
    let Rig {
        publisher,
        index,
        metrics,
        source: _source,
    } = r;
    let addr = publisher.address().to_string();
    let replay = publisher.replay_address().map(str::to_string);
    drop(publisher);
    // The new process numbers from 0 again and has a fresh cache.
    let mut again = loop {
        match ZmqKvPublisher::bind(&addr, replay.as_deref(), 0, EventFormat::Map).await {
            Ok(p) => break p,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let idx = index.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while idx.overlap(&prompt(9, 1)) == 0 {
        assert!(Instant::now() < deadline, "restart not followed");
        again.publish(&[store(&prompt(9, 1), 4)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metrics
            .resets
            .with_label_values(&["7", "0", "restart"])
            .get(),
        1
    );
    assert_eq!(
        index.overlap(&prompt(0, 1)),
        0,
        "blocks of the old process are gone"
    );
    assert_eq!(index.overlap(&prompt(1, 1)), 0);
}

#[tokio::test]
async fn garbage_and_foreign_sizes_are_counted_not_fatal() {
    let mut r = rig(true, EventFormat::Map).await;
    r.warm_up().await;
    // A raw PUB on another port cannot reach this SUB; garbage goes through
    // the same publisher's socket instead, as bad payloads would.
    r.publisher
        .publish(&[store(&prompt(6, 2), 8)]) // block size 8 ≠ the router's 4
        .await
        .unwrap();
    r.publisher
        .publish(&[store(&prompt(7, 1), 4)])
        .await
        .unwrap();
    let idx = r.index.clone();
    wait_for("after the foreign size", || idx.overlap(&prompt(7, 1)) == 1).await;
    assert_eq!(r.count(&r.metrics.blocks_dropped, "block_size"), 1);
    assert_eq!(r.index.overlap(&prompt(6, 2)), 0);
}

#[tokio::test]
async fn malformed_frames_are_skipped() {
    // A scripted engine: a PUB that sends what it likes.
    let mut pub_socket = zeromq::PubSocket::new();
    let addr = pub_socket
        .bind("tcp://127.0.0.1:0")
        .await
        .unwrap()
        .to_string();
    let index = Arc::new(Index::default());
    let metrics = EngineMetrics::unregistered();
    let _source = KvEventSource::spawn_zmq(
        ZmqSourceConfig {
            key: W,
            endpoint: addr,
            replay_endpoint: None,
            topic: String::new(),
            block_size: BS,
            replay_timeout: Duration::from_secs(1),
        },
        index.clone(),
        metrics.clone(),
        CancellationToken::new(),
    );
    let good = kvrouter_engines::publisher::encode_batch(
        0.0,
        &[store(&prompt(1, 1), 4)],
        0,
        EventFormat::Map,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seq = 0u64;
    while index.overlap(&prompt(1, 1)) == 0 {
        assert!(Instant::now() < deadline);
        let bad: Vec<Vec<Bytes>> = vec![
            vec![Bytes::new(), Bytes::from_static(b"short")],
            vec![
                Bytes::new(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                Bytes::from_static(b"\xc1\xff"),
            ],
        ];
        for frames in bad {
            pub_socket
                .send(zeromq::ZmqMessage::try_from(frames).unwrap())
                .await
                .unwrap();
        }
        seq += 1;
        let frames = vec![
            Bytes::new(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            good.clone(),
        ];
        pub_socket
            .send(zeromq::ZmqMessage::try_from(frames).unwrap())
            .await
            .unwrap();
        seq += 1;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        metrics
            .undecodable
            .with_label_values(&["7", "0", "frames"])
            .get()
            >= 1
    );
}
