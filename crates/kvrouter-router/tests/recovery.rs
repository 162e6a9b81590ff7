//! Worker-query recovery with live mock workers, no JetStream: a router that
//! starts after the workers rebuilds what they cache; KV events lost in
//! transit (a lossy plane, a real NATS restart) are detected, counted and
//! repaired, so `find_matches` ends equal to an index built from scratch from
//! the workers' own blocks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use kvrouter_core::index::RadixIndex;
use kvrouter_core::llm::{PreprocessedRequest, StopConditions};
use kvrouter_core::{KvRouterConfig, WorkerKey};
use kvrouter_mocker::engine::EngineConfig;
use kvrouter_mocker::service::{self, MockWorker, WorkerConfig};
use kvrouter_router::WorkerPool;
use kvrouter_runtime::discovery::{Discovery, MemDiscovery};
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::events::{EventError, EventPlane, InProcEvents, NatsEvents, Subscription};
use kvrouter_runtime::node::{Node, Plane};
use kvrouter_runtime::testing::NatsServer;

mod common;

const BLOCK: usize = common::BLOCK as usize;

async fn router(node: &Node, endpoint: &EndpointId) -> Arc<WorkerPool> {
    common::pool(node, endpoint, KvRouterConfig::default(), 2).await
}

async fn workers(node: &Node, endpoint: &EndpointId) -> Vec<MockWorker> {
    let cfg = WorkerConfig {
        engine: EngineConfig {
            speedup_ratio: 100.0,
            // Small caches: the workload evicts, so removals are lost too.
            num_gpu_blocks: 48,
            ..EngineConfig::default()
        },
        ..WorkerConfig::default()
    };
    let mut out = Vec::new();
    for id in [1, 2] {
        out.push(
            service::start(node, endpoint, id, cfg.clone())
                .await
                .unwrap(),
        );
    }
    out
}

fn prompt(conversation: u32, turn: u32) -> Vec<u32> {
    // Turns of one conversation share their history: prefixes grow turn by turn.
    (0..(turn + 1) * 200)
        .map(|i| 3 + (conversation * 7919 + i * 31) % 3900)
        .collect()
}

/// Routes every conversation's `turn` through `pool`; returns the prompts.
async fn route_turn(pool: &Arc<WorkerPool>, turn: u32) -> Vec<Vec<u32>> {
    let mut prompts = Vec::new();
    for conversation in 0..8 {
        let tokens = prompt(conversation, turn);
        let req = PreprocessedRequest {
            token_ids: tokens.clone(),
            stop_conditions: StopConditions {
                max_tokens: Some(2),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut s = pool
            .generate(&req, &format!("c{conversation}t{turn}"))
            .await
            .unwrap();
        while let Some(out) = s.next().await {
            out.unwrap();
        }
        prompts.push(tokens);
    }
    prompts
}

type Answers = Vec<Vec<(WorkerKey, u32)>>;

fn answers(pool: &WorkerPool, prompts: &[Vec<u32>]) -> Answers {
    prompts
        .iter()
        .map(|p| pool.router().find_matches(p).sorted())
        .collect()
}

/// What an index built from scratch from the workers' own blocks answers.
fn truth(workers: &[MockWorker], prompts: &[Vec<u32>]) -> Answers {
    let mut idx = RadixIndex::new();
    for w in workers {
        for log in w.logs() {
            for ev in log.lock().dump() {
                let _ = idx.apply_event(&ev);
            }
        }
    }
    prompts
        .iter()
        .map(|p| {
            idx.find_matches(&kvrouter_core::hash::block_hashes(p, BLOCK))
                .sorted()
        })
        .collect()
}

/// Waits until the router answers as the workers' blocks say.
async fn until_equal(pool: &WorkerPool, workers: &[MockWorker], prompts: &[Vec<u32>]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (got, want) = (answers(pool, prompts), truth(workers, prompts));
        if got == want {
            assert!(
                want.iter().filter(|a| !a.is_empty()).count() >= prompts.len() / 2,
                "the workload was cached: {want:?}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the router's index differs from the workers' blocks:\n got {got:?}\nwant {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_started_after_the_workers_rebuilds_what_they_cache() {
    let node = Node::in_process();
    let endpoint: EndpointId = "rebuild.backend.generate".parse().unwrap();
    let w = workers(&node, &endpoint).await;
    let first = router(&node, &endpoint).await;
    let mut prompts = Vec::new();
    for turn in 0..3 {
        prompts.extend(route_turn(&first, turn).await);
    }
    until_equal(&first, &w, &prompts).await;
    let before = answers(&first, &prompts);
    // The router dies; a new one (no JetStream, no snapshot) knows only what it asks.
    drop(first);
    let second = router(&node, &endpoint).await;
    until_equal(&second, &w, &prompts).await;
    assert_eq!(answers(&second, &prompts), before);
    let m = second.router().metrics();
    assert_eq!(m.recoveries.with_label_values(&["dump"]).get(), 2);
}

/// The in-process plane, but KV events to this plane's subscribers are lost
/// while `dropping` is set: a transport outage, for the router only.
struct Lossy {
    inner: Arc<InProcEvents>,
    dropping: Arc<AtomicBool>,
}

#[async_trait]
impl EventPlane for Lossy {
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), EventError> {
        self.inner.publish(subject, payload).await
    }

    async fn subscribe(&self, subject: &str) -> Result<Subscription, EventError> {
        let sub = self.inner.subscribe(subject).await?;
        let dropping = self.dropping.clone();
        let kv = subject.ends_with("kv-events");
        Ok(sub
            .filter(move |_| futures::future::ready(!(kv && dropping.load(Ordering::Relaxed))))
            .boxed())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_lost_in_transit_are_detected_counted_and_repaired() {
    let discovery: Arc<dyn Discovery> = Arc::new(MemDiscovery::new());
    let plane = Arc::new(InProcEvents::new());
    let worker_node = Node::new(
        discovery.clone(),
        plane.clone(),
        Plane::Tcp,
        None,
        "127.0.0.1",
    );
    let dropping = Arc::new(AtomicBool::new(false));
    let lossy = Lossy {
        inner: plane,
        dropping: dropping.clone(),
    };
    let router_node = Node::new(discovery, Arc::new(lossy), Plane::Tcp, None, "127.0.0.1");
    let endpoint: EndpointId = "lossy.backend.generate".parse().unwrap();
    let w = workers(&worker_node, &endpoint).await;
    let pool = router(&router_node, &endpoint).await;
    let mut prompts = route_turn(&pool, 0).await;
    until_equal(&pool, &w, &prompts).await;
    // An outage: every event of a whole turn is lost on the way.
    dropping.store(true, Ordering::Relaxed);
    prompts.extend(route_turn(&pool, 1).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    dropping.store(false, Ordering::Relaxed);
    let m = pool.router().metrics();
    assert_eq!(m.event_gaps.get(), 0, "nothing shows before the next event");
    // The next events reveal the gap; the workers fill it in.
    prompts.extend(route_turn(&pool, 2).await);
    until_equal(&pool, &w, &prompts).await;
    assert!(m.event_gaps.get() >= 1, "the gap was counted");
    assert!(
        m.events_missed.get() >= 8,
        "missed {}",
        m.events_missed.get()
    );
    let repaired = m.recoveries.with_label_values(&["events"]).get()
        + m.recoveries.with_label_values(&["dump"]).get();
    assert!(
        repaired >= 3,
        "two dumps at discovery and at least one repair: {repaired}"
    );
    assert_eq!(m.recoveries.with_label_values(&["failed"]).get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_leaves_the_index_equal_to_the_workers_blocks() {
    let mut nats = NatsServer::start().expect("nats-server (make test installs it)");
    let discovery: Arc<dyn Discovery> = Arc::new(MemDiscovery::new());
    // Workers and router have their own connections, as separate processes would.
    let node = |events: NatsEvents| {
        Node::new(
            discovery.clone(),
            Arc::new(events.clone()),
            Plane::Tcp,
            Some(events.client()),
            "127.0.0.1",
        )
    };
    let worker_node = node(NatsEvents::connect(&nats.url()).await.unwrap());
    let router_node = node(NatsEvents::connect(&nats.url()).await.unwrap());
    let endpoint: EndpointId = "natsgap.backend.generate".parse().unwrap();
    let w = workers(&worker_node, &endpoint).await;
    let pool = router(&router_node, &endpoint).await;
    let mut prompts = route_turn(&pool, 0).await;
    until_equal(&pool, &w, &prompts).await;
    nats.stop();
    // Requests go on over the request plane while the event plane is down.
    prompts.extend(route_turn(&pool, 1).await);
    nats.restart().expect("nats-server restarts");
    tokio::time::sleep(Duration::from_secs(2)).await;
    prompts.extend(route_turn(&pool, 2).await);
    until_equal(&pool, &w, &prompts).await;
    let m = pool.router().metrics();
    eprintln!(
        "after the NATS restart: {} gaps, {} events missed, recoveries events/dump/failed {}/{}/{}",
        m.event_gaps.get(),
        m.events_missed.get(),
        m.recoveries.with_label_values(&["events"]).get(),
        m.recoveries.with_label_values(&["dump"]).get(),
        m.recoveries.with_label_values(&["failed"]).get()
    );
}
