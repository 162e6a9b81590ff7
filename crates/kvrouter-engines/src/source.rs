//! The KV-event source seam: one owning task per (engine, rank) reads the
//! engine's native stream and hands [`RouterEvent`]s and resets to a
//! [`KvEventSink`] (the router). Mock workers and real engines both feed the
//! router through this seam.
//!
//! The ZeroMQ source connects a SUB to the rank's PUB (reconnecting by
//! itself), checks every message is `[topic, seq(8, BE), payload]`, and
//! follows the sequence numbers ([`SeqTracker`]): a gap asks the rank's ROUTER
//! for the missing batches and checks the replay starts where asked and has
//! no hole; when there is no replay socket, or the history is gone, the rank
//! is cleared and rebuilt from live events. A sequence that goes back means
//! the engine restarted: the rank is cleared too (and replayed from 0 when it
//! can be). Undecodable input is counted and logged at a bounded rate; it
//! never stops the feed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FusedStream;
use kvrouter_core::{RouterEvent, WorkerKey};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64;
use zeromq::{Socket, SocketEvent, SocketRecv, SubSocket};

use crate::metrics::{EngineMetrics, LogLimiter, rank_labels};
use crate::replay::replay;
use crate::translate::{RankTranslator, Translated};
use crate::wire::decode_batch;

/// Where a source's events go.
pub trait KvEventSink: Send + Sync + 'static {
    /// Applies one event of a rank, in the rank's order.
    fn apply_event(&self, ev: RouterEvent);
    /// Forgets every block of one rank.
    fn reset_rank(&self, key: WorkerKey);
}

/// What a sequence number means given the ones before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqAction {
    /// The next one: apply it.
    Apply,
    /// Already applied (a live copy of a replayed batch): skip it.
    Duplicate,
    /// Batches `from..seq` are missing.
    Gap {
        /// First missing sequence number.
        from: u64,
    },
    /// The first message seen, and not the publisher's first: batches `0..seq` are unseen.
    Joined,
    /// The sequence went back: the publisher restarted.
    Restart,
}

/// Follows one publisher's sequence numbers.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    /// Last sequence number applied.
    watermark: Option<u64>,
    /// Sequence numbers in `[replay_from, watermark]` came from a replay;
    /// live copies of them are duplicates, not a restart.
    replay_from: Option<u64>,
}

impl SeqTracker {
    /// Classifies `seq` (nothing changes until [`Self::applied`]).
    pub fn observe(&self, seq: u64) -> SeqAction {
        match self.watermark {
            None if seq == 0 => SeqAction::Apply,
            None => SeqAction::Joined,
            Some(w) if seq == w + 1 => SeqAction::Apply,
            Some(w) if seq > w + 1 => SeqAction::Gap { from: w + 1 },
            Some(_) if self.replay_from.is_some_and(|f| seq >= f) => SeqAction::Duplicate,
            Some(_) => SeqAction::Restart,
        }
    }

    /// Records that `seq` was applied live.
    pub fn applied(&mut self, seq: u64) {
        if self.watermark.is_some_and(|w| seq == w + 1) {
            self.replay_from = None;
        }
        self.watermark = Some(seq);
    }

    /// Records that a replay applied batches `first..=last`.
    pub fn replayed(&mut self, first: u64, last: u64) {
        self.replay_from = Some(first);
        self.watermark = Some(last);
    }

    /// Forgets everything (after a reset).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// The last sequence number applied.
    pub fn watermark(&self) -> Option<u64> {
        self.watermark
    }
}

/// One rank's ZeroMQ stream.
#[derive(Debug, Clone)]
pub struct ZmqSourceConfig {
    /// The rank it feeds.
    pub key: WorkerKey,
    /// The rank's PUB (`tcp://host:port`).
    pub endpoint: String,
    /// The rank's ROUTER for replays, if the engine has one.
    pub replay_endpoint: Option<String>,
    /// Topic prefix subscribed to (`""` = every topic).
    pub topic: String,
    /// The router's block size.
    pub block_size: usize,
    /// How long each replay step may take.
    pub replay_timeout: Duration,
}

/// A running source's counters, readable while it runs.
#[derive(Debug, Default)]
pub struct SourceStatus {
    /// Batches applied (live or replayed).
    pub batches: AtomicU64,
    /// The SUB has received at least one message.
    pub receiving: AtomicBool,
}

/// A running source: its task, cancelled and awaited on [`Self::stop`] (or
/// cancelled when dropped).
pub struct KvEventSource {
    cancel: CancellationToken,
    handle: Option<JoinHandle<()>>,
    status: Arc<SourceStatus>,
    key: WorkerKey,
}

impl KvEventSource {
    /// Starts following `cfg`'s stream into `sink`.
    pub fn spawn_zmq(
        cfg: ZmqSourceConfig,
        sink: Arc<dyn KvEventSink>,
        metrics: EngineMetrics,
        cancel: CancellationToken,
    ) -> Self {
        let status = Arc::new(SourceStatus::default());
        let key = cfg.key;
        let feed = Feed {
            translator: RankTranslator::new(cfg.key, cfg.block_size),
            seq: SeqTracker::default(),
            labels: rank_labels(cfg.key),
            cfg,
            sink,
            metrics,
            status: status.clone(),
            warn: LogLimiter::new(Duration::from_secs(10)),
            size_reported: false,
            last_digest: None,
        };
        let handle = tokio::spawn(feed.run(cancel.clone()));
        Self {
            cancel,
            handle: Some(handle),
            status,
            key,
        }
    }

    /// The rank fed.
    pub fn key(&self) -> WorkerKey {
        self.key
    }

    /// Its counters.
    pub fn status(&self) -> &Arc<SourceStatus> {
        &self.status
    }

    /// Stops the task and waits for it.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }
}

impl Drop for KvEventSource {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct Feed {
    cfg: ZmqSourceConfig,
    translator: RankTranslator,
    seq: SeqTracker,
    sink: Arc<dyn KvEventSink>,
    metrics: EngineMetrics,
    labels: [String; 2],
    status: Arc<SourceStatus>,
    warn: LogLimiter,
    size_reported: bool,
    /// Hash of the last batch applied, to prove continuity across a replay.
    last_digest: Option<u64>,
}

impl Feed {
    fn labels(&self) -> [&str; 2] {
        [&self.labels[0], &self.labels[1]]
    }

    fn count_undecodable(&self, reason: &str, detail: &str) {
        let [w, r] = self.labels();
        self.metrics
            .undecodable
            .with_label_values(&[w, r, reason])
            .inc();
        if let Some(suppressed) = self.warn.allow() {
            tracing::warn!(
                endpoint = %self.cfg.endpoint, worker = w, dp_rank = r, reason, detail,
                suppressed, "undecodable engine KV message skipped"
            );
        }
    }

    /// Connects, catches up, follows; on a lost connection starts over with a
    /// new socket (the engine may be a new process: the catch-up proves it).
    /// Reconnection is retried here, every ≤ 2 s, rather than by the socket's
    /// own backoff, which grows to 30 s and would leave a restarted engine's
    /// blocks stale for that long.
    async fn run(mut self, cancel: CancellationToken) {
        use backoff::backoff::Backoff;
        let mut retry = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(100))
            .with_max_interval(Duration::from_secs(2))
            .with_max_elapsed_time(None)
            .build();
        let mut first = true;
        while !cancel.is_cancelled() {
            let mut sub = SubSocket::new();
            let mut monitor = sub.monitor().fuse();
            let connected = tokio::select! {
                _ = cancel.cancelled() => return,
                r = tokio::time::timeout(Duration::from_secs(1), sub.connect(&self.cfg.endpoint)) => r,
            };
            match connected {
                Ok(Ok(())) => {}
                failed => {
                    if first {
                        tracing::warn!(endpoint = %self.cfg.endpoint, outcome = ?failed.map_err(|_| "timed out"), "cannot connect to the engine's KV event publisher; retrying");
                        first = false;
                    }
                    let wait = retry.next_backoff().unwrap_or(Duration::from_secs(2));
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            }
            if let Err(e) = sub.subscribe(&self.cfg.topic).await {
                tracing::warn!(endpoint = %self.cfg.endpoint, error = %e, "subscribe failed; retrying");
                continue;
            }
            retry.reset();
            first = true;
            tracing::info!(endpoint = %self.cfg.endpoint, worker = self.cfg.key.worker_id, dp_rank = self.cfg.key.dp_rank, "subscribed to engine KV events");
            // An engine that ran before the router (or while it was away) may be idle now:
            // take its history from the replay buffer instead of waiting for its next batch.
            self.sync_history().await;
            loop {
                let msg = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return,
                    ev = monitor.next(), if !monitor.is_terminated() => {
                        if let Some(SocketEvent::Disconnected(_)) = ev {
                            tracing::info!(endpoint = %self.cfg.endpoint, "engine KV publisher disconnected; reconnecting");
                            break;
                        }
                        continue;
                    }
                    m = sub.recv() => m,
                };
                match msg {
                    Ok(m) => self.on_message(m.into_vec()).await,
                    Err(e) => {
                        tracing::warn!(endpoint = %self.cfg.endpoint, error = %e, "KV event socket failed; reconnecting");
                        break;
                    }
                }
            }
        }
    }

    async fn on_message(&mut self, frames: Vec<Bytes>) {
        self.status.receiving.store(true, Ordering::Relaxed);
        if frames.len() != 3 || frames[1].len() != 8 {
            let detail = format!(
                "{} frames (seq frame {} bytes); expected [topic, seq(8), payload]",
                frames.len(),
                frames.get(1).map_or(0, Bytes::len)
            );
            self.count_undecodable("frames", &detail);
            return;
        }
        let seq = u64::from_be_bytes(frames[1][..].try_into().expect("checked length"));
        let payload = frames.into_iter().nth(2).expect("three frames");
        let labels = self.labels.clone();
        let [w, r] = [labels[0].as_str(), labels[1].as_str()];
        self.metrics.batches.with_label_values(&[w, r]).inc();
        let action = self.seq.observe(seq);
        match action {
            SeqAction::Apply => {}
            SeqAction::Duplicate => return,
            SeqAction::Gap { from } => {
                self.metrics.gaps.with_label_values(&[w, r]).inc();
                tracing::warn!(endpoint = %self.cfg.endpoint, from, to = seq, "KV event gap; replaying");
                if self.recover(from, seq).await {
                    return;
                }
            }
            SeqAction::Joined => {
                // Batches before this one are unseen: replay them if the engine can.
                if self.recover(0, seq).await {
                    return;
                }
            }
            SeqAction::Restart => {
                tracing::warn!(endpoint = %self.cfg.endpoint, seq, previous = ?self.seq.watermark(), "engine restarted (sequence went back); clearing its blocks");
                self.reset("restart");
                if seq > 0 && self.recover(0, seq).await {
                    return;
                }
            }
        }
        self.apply(&payload);
        self.seq.applied(seq);
        self.metrics
            .last_seq
            .with_label_values(&[w, r])
            .set(seq as i64);
    }

    /// Catches up with what the engine published while no one listened:
    /// from batch 0 on a first connection, from the last batch applied (as
    /// the continuity anchor) after a reconnection.
    async fn sync_history(&mut self) {
        if self.cfg.replay_endpoint.is_none() {
            return;
        }
        match self.seq.watermark() {
            Some(w) => {
                self.recover(w + 1, w).await;
            }
            None => {
                self.recover(0, 0).await;
            }
        }
    }

    /// Replays `from..` to cover up to `upto`; `true` when the replay
    /// included `upto` itself (the live copy is then a duplicate). Without a
    /// complete history the rank is cleared and what arrives is applied.
    ///
    /// Sequence numbers alone cannot tell a gap from a restarted engine that
    /// has already published more than its predecessor, so a replay after a
    /// gap starts one batch early, at the last one applied: the same bytes
    /// prove the same process; other bytes mean a restart, and the rank is
    /// rebuilt from the new process's batch 0.
    async fn recover(&mut self, mut from: u64, upto: u64) -> bool {
        let labels = self.labels.clone();
        let [w, r] = [labels[0].as_str(), labels[1].as_str()];
        let Some(endpoint) = self.cfg.replay_endpoint.clone() else {
            self.metrics
                .replays
                .with_label_values(&[w, r, "unavailable"])
                .inc();
            if from > 0 || self.seq.watermark().is_some() {
                self.reset("history_lost");
            }
            return false;
        };
        let mut cleared = false;
        loop {
            let anchor = self.last_digest.filter(|_| from > 0);
            let ask = if anchor.is_some() { from - 1 } else { from };
            let rep = replay(&endpoint, ask, self.cfg.replay_timeout).await;
            let mut batches = match rep {
                Ok(rep) if rep.complete_from(ask) => rep.batches,
                // Nothing published yet (and nothing applied): nothing missed.
                Ok(rep) if rep.batches.is_empty() && anchor.is_none() && ask == 0 => return false,
                outcome => {
                    self.metrics
                        .replays
                        .with_label_values(&[w, r, "incomplete"])
                        .inc();
                    tracing::warn!(endpoint, from = ask, outcome = ?outcome.as_ref().map(|r| r.batches.first().map(|b| b.0)), "replay incomplete (history gone or cut short); clearing the rank");
                    if !cleared {
                        self.reset("history_lost");
                        cleared = true;
                    }
                    if anchor.is_some() {
                        // A restarted engine may still hold its whole history.
                        from = 0;
                        continue;
                    }
                    return false;
                }
            };
            if let Some(digest) = anchor {
                let (_, first) = batches.remove(0);
                if xxh3_64(&first) != digest {
                    tracing::warn!(
                        endpoint,
                        "the engine's history differs from what was applied: it restarted; clearing its blocks"
                    );
                    self.reset("restart");
                    cleared = true;
                    from = 0;
                    continue;
                }
            }
            self.metrics
                .replays
                .with_label_values(&[w, r, "complete"])
                .inc();
            let (Some(first), Some(last)) =
                (batches.first().map(|b| b.0), batches.last().map(|b| b.0))
            else {
                return false;
            };
            for (_, payload) in &batches {
                self.apply(payload);
            }
            self.seq.replayed(first, last);
            self.metrics
                .last_seq
                .with_label_values(&[w, r])
                .set(last as i64);
            tracing::info!(endpoint, from, to = last, "replay complete");
            return last >= upto;
        }
    }

    fn reset(&mut self, reason: &str) {
        let [w, r] = self.labels();
        self.metrics.resets.with_label_values(&[w, r, reason]).inc();
        self.seq.reset();
        self.last_digest = None;
        self.translator.reset();
        self.sink.reset_rank(self.cfg.key);
    }

    fn apply(&mut self, payload: &[u8]) {
        self.last_digest = Some(xxh3_64(payload));
        let batch = match decode_batch(payload) {
            Ok(b) => b,
            Err(e) => {
                self.count_undecodable(e.label(), &e.to_string());
                return;
            }
        };
        for (_, e) in &batch.skipped {
            self.count_undecodable(e.label(), &e.to_string());
        }
        self.status.batches.fetch_add(1, Ordering::Relaxed);
        let mut mismatch = None;
        for ev in batch.events {
            let metrics = &self.metrics;
            let labels = &self.labels;
            let out = self.translator.translate(ev, |why, n| {
                if why == crate::translate::Dropped::BlockSize {
                    mismatch = Some(());
                }
                metrics
                    .blocks_dropped
                    .with_label_values(&[&labels[0], &labels[1], why.label()])
                    .inc_by(n as u64);
            });
            match out {
                Some(Translated::Event(ev)) => self.sink.apply_event(ev),
                Some(Translated::Reset) => {
                    let [w, r] = self.labels();
                    self.metrics
                        .resets
                        .with_label_values(&[w, r, "cleared"])
                        .inc();
                    self.sink.reset_rank(self.cfg.key);
                }
                None => {}
            }
        }
        if mismatch.is_some() && !self.size_reported {
            self.size_reported = true;
            tracing::error!(
                endpoint = %self.cfg.endpoint,
                router_block_size = self.cfg.block_size,
                "the engine publishes blocks of another size than the router's --kv-cache-block-size \
                 ({}); those blocks are not indexed. Start the engine with the same block size \
                 (vLLM --block-size, SGLang --page-size)",
                self.cfg.block_size
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_rules() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe(0), SeqAction::Apply);
        assert_eq!(t.observe(5), SeqAction::Joined);
        t.applied(0);
        assert_eq!(t.observe(1), SeqAction::Apply);
        t.applied(1);
        assert_eq!(t.observe(4), SeqAction::Gap { from: 2 });
        // A replay covered 2..=6: live copies of 4..=6 are duplicates.
        t.replayed(2, 6);
        assert_eq!(t.observe(4), SeqAction::Duplicate);
        assert_eq!(t.observe(6), SeqAction::Duplicate);
        assert_eq!(t.observe(1), SeqAction::Restart);
        assert_eq!(t.observe(7), SeqAction::Apply);
        t.applied(7);
        // Past the replayed window, going back is a restart.
        assert_eq!(t.observe(3), SeqAction::Restart);
        assert_eq!(t.observe(0), SeqAction::Restart);
    }
}
