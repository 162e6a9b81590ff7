//! Request migration with live mock workers (in-process planes): a stream
//! whose worker crashes mid-generation continues on another worker when the
//! pool has a migration limit — every token once, usage against the original
//! prompt — and ends with the worker's error when it has none or has used it.

use std::sync::Arc;
use std::time::Duration;

use kvrouter_core::KvRouterConfig;
use kvrouter_core::llm::{PreprocessedRequest, StopConditions};
use kvrouter_mocker::engine::EngineConfig;
use kvrouter_mocker::service::{self, MockWorker, WorkerConfig};
use kvrouter_router::WorkerPool;
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::node::Node;

mod common;

const MAX_TOKENS: u32 = 60;
const PROMPT: usize = 300;

async fn setup(workers: u64, limit: u32) -> (Vec<MockWorker>, Arc<WorkerPool>) {
    let node = Node::in_process();
    let endpoint: EndpointId = "migrate.backend.generate".parse().unwrap();
    let cfg = WorkerConfig {
        engine: EngineConfig {
            // About 10 ms a token: the crash lands mid-stream.
            speedup_ratio: 2.0,
            ..EngineConfig::default()
        },
        ..WorkerConfig::default()
    };
    let mut ws = Vec::new();
    for id in 1..=workers {
        ws.push(
            service::start(&node, &endpoint, id, cfg.clone())
                .await
                .unwrap(),
        );
    }
    let pool = common::pool(
        &node,
        &endpoint,
        KvRouterConfig::default(),
        workers as usize,
    )
    .await;
    pool.set_migration_limit(limit);
    (ws, pool)
}

fn request() -> PreprocessedRequest {
    PreprocessedRequest {
        token_ids: (0..PROMPT as u32).map(|i| 3 + i % 3000).collect(),
        stop_conditions: StopConditions {
            max_tokens: Some(MAX_TOKENS),
            ignore_eos: Some(true),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn crash(workers: &mut Vec<MockWorker>, id: u64) {
    let i = workers
        .iter()
        .position(|w| w.id() == id)
        .expect("the worker");
    workers.remove(i).crash();
}

/// Streams the request, crashing its worker after each of `crash_after`
/// tokens; returns the tokens, the last usage, the workers seen and the error.
async fn run(
    pool: &Arc<WorkerPool>,
    workers: &mut Vec<MockWorker>,
    crash_after: &[usize],
) -> (Vec<u32>, Option<(u32, u32)>, Vec<u64>, Option<String>) {
    let mut s = pool.generate(&request(), "migrating").await.unwrap();
    let (mut tokens, mut usage, mut seen) = (Vec::new(), None, vec![s.worker_id()]);
    let mut crashes = crash_after.iter().peekable();
    loop {
        let item = tokio::time::timeout(Duration::from_secs(20), s.next())
            .await
            .expect("no hang");
        match item {
            None => return (tokens, usage, seen, None),
            Some(Err(e)) => return (tokens, usage, seen, Some(e.to_string())),
            Some(Ok(out)) => {
                tokens.extend(out.token_ids);
                if let Some(u) = out.completion_usage {
                    usage = Some((u.prompt_tokens, u.completion_tokens));
                }
                if seen.last() != Some(&s.worker_id()) {
                    seen.push(s.worker_id());
                }
                if out.finish_reason.is_some() {
                    return (tokens, usage, seen, None);
                }
            }
        }
        if crashes.peek().is_some_and(|&&n| tokens.len() >= n) {
            crashes.next();
            crash(workers, s.worker_id());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_worker_crashes_continues_on_another() {
    let (mut workers, pool) = setup(2, 1).await;
    let (tokens, usage, seen, error) = run(&pool, &mut workers, &[10]).await;
    assert_eq!(error, None, "the client saw no error");
    assert_eq!(tokens.len(), MAX_TOKENS as usize, "every token once");
    assert_eq!(
        usage,
        Some((PROMPT as u32, MAX_TOKENS)),
        "usage of the whole request"
    );
    assert_eq!(seen.len(), 2, "it moved once: {seen:?}");
    let m = pool.router().metrics();
    assert_eq!(
        m.migrations.with_label_values(&["ongoing_request"]).get(),
        1
    );
    assert_eq!(m.migration_limit.get(), 1);
    // The migrated request left nothing behind in the router's load model.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while pool.router().state().iter().any(|r| r.active_requests > 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "requests still tracked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_migration_limit_the_worker_error_reaches_the_caller() {
    let (mut workers, pool) = setup(2, 0).await;
    let (tokens, _, seen, error) = run(&pool, &mut workers, &[10]).await;
    assert!(error.is_some(), "an error, not a silent end");
    assert!(tokens.len() < MAX_TOKENS as usize);
    assert_eq!(seen.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_bounds_how_often_a_stream_moves() {
    let (mut workers, pool) = setup(3, 1).await;
    let (tokens, _, seen, error) = run(&pool, &mut workers, &[10, 20]).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(error.is_some(), "the second failure is the caller's to see");
    assert!(tokens.len() >= 20 && tokens.len() < MAX_TOKENS as usize);
}
