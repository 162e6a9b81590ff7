//! The router's Prometheus metrics, under the reference's names (§13), in a
//! registry the caller owns (the frontend exposes it at `/metrics`).
//!
//! Histograms of routing overhead are in milliseconds, as Dynamo's are; the
//! hit-rate histogram is the router's predicted overlap at routing time.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The content type of Prometheus text exposition (format 0.0.4).
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything in `registry` as Prometheus text: the one encoder every
/// `/metrics` endpoint of kvrouter uses.
pub fn prometheus_text(registry: &Registry) -> prometheus::Result<Vec<u8>> {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf)?;
    Ok(buf)
}

/// Buckets for per-request routing overhead, in ms (1 µs … 100 ms).
const OVERHEAD_MS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.5, 1.0, 2.0,
    5.0, 10.0, 100.0,
];

/// Every metric the router records.
#[derive(Clone)]
pub struct RouterMetrics {
    /// `dynamo_routing_overhead_block_hashing_ms`.
    pub block_hashing_ms: Histogram,
    /// `dynamo_routing_overhead_indexer_find_matches_ms`.
    pub find_matches_ms: Histogram,
    /// `dynamo_routing_overhead_seq_hashing_ms`.
    pub seq_hashing_ms: Histogram,
    /// `dynamo_routing_overhead_scheduling_ms`.
    pub scheduling_ms: Histogram,
    /// `dynamo_routing_overhead_total_ms`.
    pub total_ms: Histogram,
    /// `dynamo_component_router_requests_total{router_mode,status}`.
    pub requests: IntCounterVec,
    /// `dynamo_component_router_kv_hit_rate` (predicted, 0..1).
    pub kv_hit_rate: Histogram,
    /// `dynamo_component_router_input_sequence_tokens`.
    pub isl: Histogram,
    /// `dynamo_kvrouter_kv_cache_events_applied{event_type,status}`.
    pub events_applied: IntCounterVec,
    /// `dynamo_kvrouter_kv_cache_events_rejected{reason}`: messages that could not be decoded.
    pub events_rejected: IntCounterVec,
    /// `dynamo_frontend_worker_active_decode_blocks{worker_id,dp_rank,worker_type}`.
    pub worker_decode_blocks: IntGaugeVec,
    /// `dynamo_frontend_worker_active_prefill_tokens{worker_id,dp_rank,worker_type}`.
    pub worker_prefill_tokens: IntGaugeVec,
    /// `dynamo_frontend_worker_active_requests{worker_id,dp_rank,worker_type}`.
    pub worker_requests: IntGaugeVec,
    /// `dynamo_component_router_worker_selected_total{worker_id}`.
    pub selected: IntCounterVec,
    /// `dynamo_kvrouter_index_snapshots_total`: snapshots uploaded (durable mode).
    pub snapshots: prometheus::IntCounter,
    /// `kvrouter_kv_event_gaps_total`: gaps found in a (worker, rank)'s event ids.
    pub event_gaps: prometheus::IntCounter,
    /// `kvrouter_kv_events_missed_total`: event ids those gaps skipped.
    pub events_missed: prometheus::IntCounter,
    /// `kvrouter_kv_recoveries_total{result}`: recovery queries answered with
    /// `events` or a `dump`, or `failed`.
    pub recoveries: IntCounterVec,
    /// `dynamo_frontend_model_migration_total{migration_type}`: requests moved
    /// to another worker, before their first response (`new_request`) or mid-stream
    /// (`ongoing_request`).
    pub migrations: IntCounterVec,
    /// `dynamo_frontend_model_migration_limit`.
    pub migration_limit: prometheus::IntGauge,
    /// `kvrouter_router_queued_requests`: requests held in the router queue
    /// (a part of the frontend's `dynamo_frontend_queued_requests`).
    pub queue_depth: prometheus::IntGauge,
}

fn hist(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid histogram")
}

impl RouterMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let worker_labels = &["worker_id", "dp_rank", "worker_type"];
        let m = Self {
            block_hashing_ms: hist(
                "dynamo_routing_overhead_block_hashing_ms",
                "Time to hash the prompt into KV blocks (ms)",
                OVERHEAD_MS,
            ),
            find_matches_ms: hist(
                "dynamo_routing_overhead_indexer_find_matches_ms",
                "Time to look the blocks up in the KV index (ms)",
                OVERHEAD_MS,
            ),
            seq_hashing_ms: hist(
                "dynamo_routing_overhead_seq_hashing_ms",
                "Time to compute the blocks' sequence hashes for load tracking (ms)",
                OVERHEAD_MS,
            ),
            scheduling_ms: hist(
                "dynamo_routing_overhead_scheduling_ms",
                "Time to compute worker loads and select a worker (ms)",
                OVERHEAD_MS,
            ),
            total_ms: hist(
                "dynamo_routing_overhead_total_ms",
                "Total routing overhead per request (ms)",
                OVERHEAD_MS,
            ),
            requests: IntCounterVec::new(
                Opts::new(
                    "dynamo_component_router_requests_total",
                    "Routing decisions, by router mode and outcome",
                ),
                &["router_mode", "status"],
            )?,
            kv_hit_rate: hist(
                "dynamo_component_router_kv_hit_rate",
                "Predicted fraction of the prompt's blocks cached on the chosen worker",
                &[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
            ),
            isl: hist(
                "dynamo_component_router_input_sequence_tokens",
                "Prompt length of routed requests (tokens)",
                &prometheus::exponential_buckets(16.0, 2.0, 14)?,
            ),
            events_applied: IntCounterVec::new(
                Opts::new(
                    "dynamo_kvrouter_kv_cache_events_applied",
                    "KV cache events applied to the index, by type and outcome",
                ),
                &["event_type", "status"],
            )?,
            events_rejected: IntCounterVec::new(
                Opts::new(
                    "dynamo_kvrouter_kv_cache_events_rejected",
                    "Event-plane messages that could not be decoded (skipped)",
                ),
                &["reason"],
            )?,
            worker_decode_blocks: IntGaugeVec::new(
                Opts::new(
                    "dynamo_frontend_worker_active_decode_blocks",
                    "Decode blocks the router predicts active on a worker rank",
                ),
                worker_labels,
            )?,
            worker_prefill_tokens: IntGaugeVec::new(
                Opts::new(
                    "dynamo_frontend_worker_active_prefill_tokens",
                    "Prefill tokens the router predicts queued on a worker rank",
                ),
                worker_labels,
            )?,
            worker_requests: IntGaugeVec::new(
                Opts::new(
                    "dynamo_frontend_worker_active_requests",
                    "Requests the router tracks as in flight on a worker rank",
                ),
                worker_labels,
            )?,
            selected: IntCounterVec::new(
                Opts::new(
                    "dynamo_component_router_worker_selected_total",
                    "Requests routed to each worker",
                ),
                &["worker_id"],
            )?,
            snapshots: prometheus::IntCounter::new(
                "dynamo_kvrouter_index_snapshots_total",
                "Index snapshots uploaded to the object store (durable KV events)",
            )?,
            event_gaps: prometheus::IntCounter::new(
                "kvrouter_kv_event_gaps_total",
                "Gaps found in a worker rank's KV event ids (events lost in transit)",
            )?,
            events_missed: prometheus::IntCounter::new(
                "kvrouter_kv_events_missed_total",
                "KV event ids skipped by gaps",
            )?,
            recoveries: IntCounterVec::new(
                Opts::new(
                    "kvrouter_kv_recoveries_total",
                    "Worker queries that repaired lost KV events or rebuilt a rank, by result",
                ),
                &["result"],
            )?,
            migrations: IntCounterVec::new(
                Opts::new(
                    "dynamo_frontend_model_migration_total",
                    "Requests moved to another worker after a worker failed, by when",
                ),
                &["migration_type"],
            )?,
            migration_limit: prometheus::IntGauge::new(
                "dynamo_frontend_model_migration_limit",
                "Times a failed stream may move to another worker",
            )?,
            queue_depth: prometheus::IntGauge::new(
                "kvrouter_router_queued_requests",
                "Requests held in the router queue while every worker is saturated",
            )?,
        };
        // Every known series exists from the start at 0, so dashboards and
        // alerts see a flat line rather than no data until the first event.
        for reason in [
            "decode",
            "load",
            "active_sequences",
            "unknown_worker",
            "stale",
            "recovery_overflow",
        ] {
            m.events_rejected.with_label_values(&[reason]);
        }
        for kind in ["stored", "removed", "cleared"] {
            m.events_applied.with_label_values(&[kind, "ok"]);
        }
        for t in ["new_request", "ongoing_request"] {
            m.migrations.with_label_values(&[t]);
        }
        for r in ["events", "dump", "failed"] {
            m.recoveries.with_label_values(&[r]);
        }
        registry.register(Box::new(m.block_hashing_ms.clone()))?;
        registry.register(Box::new(m.find_matches_ms.clone()))?;
        registry.register(Box::new(m.seq_hashing_ms.clone()))?;
        registry.register(Box::new(m.scheduling_ms.clone()))?;
        registry.register(Box::new(m.total_ms.clone()))?;
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.kv_hit_rate.clone()))?;
        registry.register(Box::new(m.isl.clone()))?;
        registry.register(Box::new(m.events_applied.clone()))?;
        registry.register(Box::new(m.events_rejected.clone()))?;
        registry.register(Box::new(m.worker_decode_blocks.clone()))?;
        registry.register(Box::new(m.worker_prefill_tokens.clone()))?;
        registry.register(Box::new(m.worker_requests.clone()))?;
        registry.register(Box::new(m.selected.clone()))?;
        registry.register(Box::new(m.snapshots.clone()))?;
        registry.register(Box::new(m.event_gaps.clone()))?;
        registry.register(Box::new(m.events_missed.clone()))?;
        registry.register(Box::new(m.recoveries.clone()))?;
        registry.register(Box::new(m.migrations.clone()))?;
        registry.register(Box::new(m.migration_limit.clone()))?;
        registry.register(Box::new(m.queue_depth.clone()))?;
        Ok(m)
    }

    /// Metrics registered nowhere (tests, tools).
    pub fn unregistered() -> Self {
        Self::new(&Registry::new()).expect("fresh registry")
    }
}
