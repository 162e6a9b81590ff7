//! What the engine adapters count, as Prometheus families
//! (`kvrouter_engine_*`), and a rate limiter for the warnings that go with
//! them: a flood of bad frames writes one line per interval with the number
//! suppressed, never one line each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvrouter_core::WorkerKey;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// The adapters' metrics (cheap to clone: the families are shared).
#[derive(Clone)]
pub struct EngineMetrics {
    /// Batches received live, per rank.
    pub batches: IntCounterVec,
    /// Sequence gaps detected, per rank.
    pub gaps: IntCounterVec,
    /// Replays asked for, by outcome (`complete`, `incomplete`, `unavailable`).
    pub replays: IntCounterVec,
    /// Ranks cleared, by reason (`restart`, `history_lost`, `cleared`).
    pub resets: IntCounterVec,
    /// Messages or events that did not decode, by reason.
    pub undecodable: IntCounterVec,
    /// Blocks not indexed, by reason (`block_size`, `medium`, `group`, `salted`, `malformed`).
    pub blocks_dropped: IntCounterVec,
    /// Last sequence number applied, per rank.
    pub last_seq: IntGaugeVec,
    /// 1 while an engine answers its health probe, else 0.
    pub healthy: IntGaugeVec,
    /// Engine load as scraped from its `/metrics` (`running`, `waiting`, `kv_usage_perc` ×1000).
    pub scraped: IntGaugeVec,
    /// Upstream requests by outcome (`ok`, `client_error`, `server_error`, `unreachable`, `failed_mid_stream`).
    pub upstream: IntCounterVec,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

const RANK: &[&str] = &["worker_id", "dp_rank"];
const RANK_REASON: &[&str] = &["worker_id", "dp_rank", "reason"];

impl EngineMetrics {
    /// Families not registered anywhere (tests, tools).
    pub fn unregistered() -> Self {
        Self {
            batches: counter(
                "kvrouter_engine_kv_batches_total",
                "KV event batches received from engines",
                RANK,
            ),
            gaps: counter(
                "kvrouter_engine_kv_sequence_gaps_total",
                "Sequence gaps detected in engines' KV event streams",
                RANK,
            ),
            replays: counter(
                "kvrouter_engine_kv_replays_total",
                "Replays requested from engines, by outcome",
                &["worker_id", "dp_rank", "outcome"],
            ),
            resets: counter(
                "kvrouter_engine_kv_resets_total",
                "Engine ranks whose indexed blocks were cleared, by reason",
                RANK_REASON,
            ),
            undecodable: counter(
                "kvrouter_engine_kv_undecodable_total",
                "Engine KV messages or events that did not decode, by reason",
                RANK_REASON,
            ),
            blocks_dropped: counter(
                "kvrouter_engine_kv_blocks_dropped_total",
                "Engine blocks not indexed, by reason",
                RANK_REASON,
            ),
            last_seq: gauge(
                "kvrouter_engine_kv_last_seq",
                "Last KV event sequence number applied per engine rank",
                RANK,
            ),
            healthy: gauge(
                "kvrouter_engine_healthy",
                "1 while the engine answers GET /health",
                &["worker_id", "url"],
            ),
            scraped: gauge(
                "kvrouter_engine_load",
                "Engine load scraped from its /metrics (kv_usage_perc in thousandths)",
                &["worker_id", "signal"],
            ),
            upstream: counter(
                "kvrouter_engine_upstream_requests_total",
                "Requests forwarded to engines, by outcome",
                &["worker_id", "outcome"],
            ),
        }
    }

    /// The families, registered in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self::unregistered();
        registry.register(Box::new(m.batches.clone()))?;
        registry.register(Box::new(m.gaps.clone()))?;
        registry.register(Box::new(m.replays.clone()))?;
        registry.register(Box::new(m.resets.clone()))?;
        registry.register(Box::new(m.undecodable.clone()))?;
        registry.register(Box::new(m.blocks_dropped.clone()))?;
        registry.register(Box::new(m.last_seq.clone()))?;
        registry.register(Box::new(m.healthy.clone()))?;
        registry.register(Box::new(m.scraped.clone()))?;
        registry.register(Box::new(m.upstream.clone()))?;
        Ok(m)
    }
}

/// Label values of a rank.
pub fn rank_labels(key: WorkerKey) -> [String; 2] {
    [key.worker_id.to_string(), key.dp_rank.to_string()]
}

/// Lets one message through per interval and counts the rest.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    start: Instant,
    /// Milliseconds since `start` of the last message let through (+1; 0 = never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// At most one message per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            start: Instant::now(),
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a message may be written now (`n` were suppressed since
    /// the last one); `None` when it must be suppressed.
    pub fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.interval.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_lets_one_through_per_interval() {
        let l = LogLimiter::new(Duration::from_millis(50));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(l.allow(), Some(2));
    }

    #[test]
    fn metrics_register_once() {
        let r = Registry::new();
        let m = EngineMetrics::new(&r).unwrap();
        m.gaps.with_label_values(&["1", "0"]).inc();
        assert!(EngineMetrics::new(&r).is_err());
        assert!(
            r.gather()
                .iter()
                .any(|f| f.name() == "kvrouter_engine_kv_sequence_gaps_total")
        );
    }
}
