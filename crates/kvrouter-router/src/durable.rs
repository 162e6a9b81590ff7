//! Durable KV events (`--durable-kv-events`, reference §7.1): the workers'
//! events go through a JetStream stream; each router is a durable consumer
//! that acknowledges what it applied; when the stream holds more than
//! `--router-snapshot-threshold` messages a router uploads a snapshot of its
//! index to the object store, then purges what every consumer acknowledged —
//! snapshot before purge, so a replica or a restarted router never loses an
//! event. On start a router loads the snapshot and consumes the rest of the
//! stream; `--router-reset-states` purges the stream and deletes the snapshot.
//!
//! Names: stream `slug(namespace.{ns}.component.{component}.kv-events)`,
//! bucket `slug(namespace.{ns}.component.{component}-radix-bucket)`, object
//! `radix-state` (a JSON array of `RouterEvent`s), where `slug` turns `.` and
//! `_` into `-`. Re-applying an event the snapshot already holds is harmless,
//! so the snapshot may run ahead of the purge point.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvrouter_core::protocols::{RouterEvent, decode_router_event};

use crate::admit::Admission;
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::events::{
    DurableEvents, DurableNames, EventError, SNAPSHOT_OBJECT, SnapshotStore, open_kv_stream,
};
use tokio_util::sync::CancellationToken;

use crate::router::KvRouter;

/// What a router did with the durable stream (for logs, tests and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Events loaded from the snapshot.
    pub snapshot_events: usize,
    /// Time to download and apply the snapshot.
    pub snapshot_load: Duration,
}

/// Loads the snapshot (or resets), then consumes the stream in the background.
/// With a `gate`, only events of workers it admits reach the index (the
/// worker pool's discovery-fed gate); without one, every event does (tools
/// replaying a stream they trust).
pub async fn start(
    client: kvrouter_runtime::async_nats::Client,
    endpoint: &EndpointId,
    router: Arc<KvRouter>,
    consumer_name: String,
    cancel: CancellationToken,
    gate: Option<Arc<Admission>>,
) -> Result<Recovery, EventError> {
    let apply = move |router: &KvRouter, ev: RouterEvent| match &gate {
        Some(g) => g.admit_into(router, ev),
        None => router.apply_event(&ev),
    };
    let names = DurableNames::of(endpoint);
    let stream = open_kv_stream(client, endpoint).await?;
    let store = stream.snapshots(&names.bucket).await?;
    let mut recovery = Recovery::default();
    if router.config().router_reset_states {
        stream.purge_all().await?;
        store.delete(SNAPSHOT_OBJECT).await?;
        tracing::info!(stream = %names.stream, "durable KV events reset");
    } else if let Some(bytes) = store.get(SNAPSHOT_OBJECT).await? {
        let t = Instant::now();
        let events: Vec<RouterEvent> = serde_json::from_slice(&bytes)
            .map_err(|e| EventError::Malformed(format!("snapshot: {e}")))?;
        let n = events.len();
        for ev in events {
            apply(&router, ev);
        }
        recovery = Recovery {
            snapshot_events: n,
            snapshot_load: t.elapsed(),
        };
        tracing::info!(events = n, elapsed = ?t.elapsed(), "index snapshot loaded");
    }
    let mut consumer = stream
        .consumer(&consumer_name, Duration::from_secs(30))
        .await?;
    let threshold = u64::from(
        router
            .config()
            .router_snapshot_threshold
            .unwrap_or(1_000_000),
    );
    tokio::spawn(async move {
        // Checked about once a second, jittered so replicas do not snapshot in lockstep.
        let jitter = Duration::from_millis(900 + u64::from(consumer_name.len() as u32 % 200));
        let mut tick = tokio::time::interval(jitter);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        use backoff::backoff::Backoff;
        // Consumer errors (NATS away, JetStream failing over) back off from
        // 100 ms to 5 s instead of spinning; a delivered event resets it.
        let mut retry = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(100))
            .with_max_interval(Duration::from_secs(5))
            .with_max_elapsed_time(None)
            .build();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = maybe_snapshot(&stream, &store, &router, threshold).await {
                        tracing::warn!(error = %e, "snapshot/purge failed; will retry");
                    }
                }
                d = consumer.next() => match d {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "durable consumer error");
                        let wait = retry.next_backoff().unwrap_or(Duration::from_secs(5));
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                    Some(Ok(d)) => {
                        retry.reset();
                        match decode_router_event(&d.payload) {
                            Ok(ev) => apply(&router, ev),
                            Err(e) => {
                                router.metrics().events_rejected.with_label_values(&["decode"]).inc();
                                tracing::warn!(error = %e, sequence = d.sequence, "undecodable durable KV event skipped");
                            }
                        }
                        if let Err(e) = d.ack().await {
                            tracing::warn!(error = %e, "ack failed (the event will be redelivered)");
                        }
                    }
                },
            }
        }
        // A router leaving for good must not hold the purge floor back.
        if let Err(e) = stream.delete_consumer(&consumer_name).await {
            tracing::debug!(error = %e, "consumer not deleted");
        }
    });
    Ok(recovery)
}

/// Uploads a snapshot and purges acknowledged events when the stream is long.
async fn maybe_snapshot(
    stream: &DurableEvents,
    store: &SnapshotStore,
    router: &KvRouter,
    threshold: u64,
) -> Result<(), EventError> {
    let count = stream.message_count().await?;
    if count <= threshold {
        return Ok(());
    }
    let t = Instant::now();
    let events = router.dump_events();
    let bytes = serde_json::to_vec(&events).expect("events serialize");
    store.put(SNAPSHOT_OBJECT, &bytes).await?;
    let purged = stream.purge_acknowledged().await?;
    tracing::info!(
        stream_messages = count,
        snapshot_events = events.len(),
        snapshot_bytes = bytes.len(),
        purged_to = purged,
        elapsed = ?t.elapsed(),
        "index snapshot uploaded, acknowledged events purged"
    );
    router.metrics().snapshots.inc();
    Ok(())
}

/// Publishes one event durably (the worker side).
pub async fn publish(stream: &DurableEvents, ev: &RouterEvent) -> Result<u64, EventError> {
    stream
        .publish(Bytes::from(
            serde_json::to_vec(ev).expect("events serialize"),
        ))
        .await
}
