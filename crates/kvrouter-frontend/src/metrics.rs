//! The frontend's Prometheus metrics (`dynamo_frontend_*`, reference §13),
//! registered next to the router's in one registry served at `/metrics`.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// Frontend metrics.
#[derive(Clone)]
pub struct FrontendMetrics {
    /// `dynamo_frontend_requests_total{model,endpoint,request_type,status}`.
    pub requests: IntCounterVec,
    /// `dynamo_frontend_inflight_requests{model}`.
    pub inflight: IntGaugeVec,
    /// `dynamo_frontend_queued_requests{model}`: received, no first token yet.
    pub queued: IntGaugeVec,
    /// `dynamo_frontend_time_to_first_token_seconds{model}`.
    pub ttft: HistogramVec,
    /// `dynamo_frontend_inter_token_latency_seconds{model}`.
    pub itl: HistogramVec,
    /// `dynamo_frontend_request_duration_seconds{model}`.
    pub duration: HistogramVec,
    /// `dynamo_frontend_input_sequence_tokens{model}`.
    pub isl: HistogramVec,
    /// `dynamo_frontend_output_sequence_tokens{model}`.
    pub osl: HistogramVec,
    /// `dynamo_frontend_cached_tokens{model}` (as the worker reports).
    pub cached_tokens: HistogramVec,
    /// `dynamo_frontend_preprocessing_seconds`: tokenizing and templating.
    pub preprocessing: Histogram,
    /// `dynamo_frontend_model_total_kv_blocks{model}`.
    pub model_total_kv_blocks: IntGaugeVec,
    /// `dynamo_frontend_model_max_num_seqs{model}`.
    pub model_max_num_seqs: IntGaugeVec,
    /// `dynamo_frontend_model_max_num_batched_tokens{model}`.
    pub model_max_num_batched_tokens: IntGaugeVec,
    /// `dynamo_frontend_model_kv_cache_block_size{model}`.
    pub model_block_size: IntGaugeVec,
    /// `dynamo_frontend_model_workers{model}`.
    pub model_workers: IntGaugeVec,
    /// `dynamo_frontend_model_context_length{model}`.
    pub model_context_length: IntGaugeVec,
    /// `dynamo_frontend_output_tokens_total{model}`: tokens streamed to clients.
    pub output_tokens: IntCounterVec,
    /// `dynamo_frontend_disconnected_clients{model}`: requests whose answer
    /// stopped before it was delivered — the client went away (or a request
    /// timeout or the shutdown grace cut the stream).
    pub disconnected: IntCounterVec,
    /// `dynamo_component_uptime_seconds`.
    pub uptime: prometheus::Gauge,
}

fn hv(name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Result<HistogramVec> {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["model"])
}

fn gv(name: &str, help: &str) -> prometheus::Result<IntGaugeVec> {
    IntGaugeVec::new(Opts::new(name, help), &["model"])
}

impl FrontendMetrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let secs = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 120.0,
        ];
        let tokens = prometheus::exponential_buckets(1.0, 2.0, 18)?;
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new("dynamo_frontend_requests_total", "HTTP requests served"),
                &["model", "endpoint", "request_type", "status"],
            )?,
            inflight: gv("dynamo_frontend_inflight_requests", "Requests being served")?,
            queued: gv(
                "dynamo_frontend_queued_requests",
                "Requests waiting for their first token",
            )?,
            ttft: hv(
                "dynamo_frontend_time_to_first_token_seconds",
                "Time to first token",
                secs.clone(),
            )?,
            itl: hv(
                "dynamo_frontend_inter_token_latency_seconds",
                "Time between tokens",
                secs.clone(),
            )?,
            duration: hv(
                "dynamo_frontend_request_duration_seconds",
                "Request duration",
                secs,
            )?,
            isl: hv(
                "dynamo_frontend_input_sequence_tokens",
                "Prompt length",
                tokens.clone(),
            )?,
            osl: hv(
                "dynamo_frontend_output_sequence_tokens",
                "Generated length",
                tokens.clone(),
            )?,
            cached_tokens: hv(
                "dynamo_frontend_cached_tokens",
                "Prompt tokens served from the worker's KV cache",
                tokens,
            )?,
            preprocessing: Histogram::with_opts(
                HistogramOpts::new(
                    "dynamo_frontend_preprocessing_seconds",
                    "Chat templating and tokenization",
                )
                .buckets(prometheus::exponential_buckets(1e-5, 2.0, 18)?),
            )?,
            model_total_kv_blocks: gv(
                "dynamo_frontend_model_total_kv_blocks",
                "KV blocks over all workers of the model",
            )?,
            model_max_num_seqs: gv(
                "dynamo_frontend_model_max_num_seqs",
                "Concurrent sequences per worker",
            )?,
            model_max_num_batched_tokens: gv(
                "dynamo_frontend_model_max_num_batched_tokens",
                "Tokens per forward pass per worker",
            )?,
            model_block_size: gv(
                "dynamo_frontend_model_kv_cache_block_size",
                "KV block size in tokens",
            )?,
            model_workers: gv("dynamo_frontend_model_workers", "Workers serving the model")?,
            model_context_length: gv(
                "dynamo_frontend_model_context_length",
                "Longest prompt plus output, in tokens",
            )?,
            output_tokens: IntCounterVec::new(
                Opts::new(
                    "dynamo_frontend_output_tokens_total",
                    "Tokens streamed to clients",
                ),
                &["model"],
            )?,
            disconnected: IntCounterVec::new(
                Opts::new(
                    "dynamo_frontend_disconnected_clients",
                    "Requests whose answer stopped before delivery: the client went away, or a timeout or shutdown cut it",
                ),
                &["model"],
            )?,
            uptime: prometheus::Gauge::new(
                "dynamo_component_uptime_seconds",
                "Seconds since this process's frontend started",
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.inflight.clone()))?;
        registry.register(Box::new(m.queued.clone()))?;
        registry.register(Box::new(m.ttft.clone()))?;
        registry.register(Box::new(m.itl.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.isl.clone()))?;
        registry.register(Box::new(m.osl.clone()))?;
        registry.register(Box::new(m.cached_tokens.clone()))?;
        registry.register(Box::new(m.preprocessing.clone()))?;
        registry.register(Box::new(m.model_total_kv_blocks.clone()))?;
        registry.register(Box::new(m.model_max_num_seqs.clone()))?;
        registry.register(Box::new(m.model_max_num_batched_tokens.clone()))?;
        registry.register(Box::new(m.model_block_size.clone()))?;
        registry.register(Box::new(m.model_workers.clone()))?;
        registry.register(Box::new(m.model_context_length.clone()))?;
        registry.register(Box::new(m.output_tokens.clone()))?;
        registry.register(Box::new(m.disconnected.clone()))?;
        registry.register(Box::new(m.uptime.clone()))?;
        Ok(m)
    }
}
