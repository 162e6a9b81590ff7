//! The axum application: OpenAI endpoints, health, metrics and the busy
//! threshold admin endpoint, over one model served by a [`WorkerPool`] or by
//! external engines. This file holds the frontend's state and its routes; the
//! admin routes, the request pipeline and the response are rooms of their own.
//!
//! A request is parsed and validated, templated and tokenized, checked
//! against the context length, routed (the router tracks it from here), and
//! streamed back — as server-sent events ending in `data: [DONE]`, or
//! collected into one JSON body. The routed stream is owned by the response:
//! when the client disconnects, axum drops it, which cancels the worker's
//! request and frees it in the router.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::routing::{get, post};
use kvrouter_router::disagg::PrefillClient;
use kvrouter_router::engines::EnginePool;
use kvrouter_router::{KvRouter, WorkerPool};
use prometheus::Registry;
use serde_json::Value;

use crate::error::ApiError;
use crate::metrics::FrontendMetrics;
use crate::server::HttpLimits;
use crate::tokenizer::Preprocessor;

mod admin;
mod pipeline;
mod respond;

use admin::{
    get_busy, health, kv_event_sources, live, metrics, models, not_found, router_state, set_busy,
};
pub(crate) use pipeline::{Kind, Tracker, check_model, count_rejected, header_dp_rank};
use pipeline::{chat, completions};
pub(crate) use respond::ttft_exceeded;

/// The HTTP side: which OpenAI endpoints are served, and the server's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpOptions {
    /// `/v1/chat/completions`.
    pub chat: bool,
    /// `/v1/completions`.
    pub completions: bool,
    /// Timeouts, sizes, connections and shutdown grace.
    pub limits: HttpLimits,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            chat: true,
            completions: true,
            limits: HttpLimits::default(),
        }
    }
}

/// What the frontend routes to.
pub enum Backend {
    /// kvrouter workers (mock or token-level engines) over the runtime.
    Workers(Arc<WorkerPool>),
    /// External OpenAI-HTTP engines, requests forwarded unchanged.
    Engines(Arc<EnginePool>),
}

impl Backend {
    /// The router picking among them.
    pub fn router(&self) -> &Arc<KvRouter> {
        match self {
            Backend::Workers(p) => p.router(),
            Backend::Engines(e) => e.router(),
        }
    }
}

/// The frontend's shared state.
pub struct Frontend {
    model: String,
    pub(crate) pre: Arc<Preprocessor>,
    backend: Backend,
    registry: Registry,
    metrics: FrontendMetrics,
    created: u64,
    /// When it started, for `dynamo_component_uptime_seconds`.
    started: std::time::Instant,
    ids: AtomicU64,
    salt: u64,
    /// Disaggregated serving: the prefill pool's router, and whether it is required.
    prefill: Option<(PrefillClient, bool)>,
    /// Fires when the shutdown grace period is over: what still streams ends with an error.
    pub(crate) cut: tokio_util::sync::CancellationToken,
    /// Tokenizing big prompts: one at a time per core, off the async threads.
    tokenizing: tokio::sync::Semaphore,
    /// Set when this frontend stands in for an engine (`kvrouter mocker --openai-port`).
    facade: parking_lot::RwLock<Option<EngineFacade>>,
    /// `--dyn-reasoning-parser`: chat answers split into reasoning and content.
    reasoning: parking_lot::RwLock<Option<crate::reasoning::ReasoningFormat>>,
}

/// What a stand-in engine adds to the frontend: its load in the engine's own
/// metric names (appended to `/metrics`) and the KV-event ports it advertises
/// (`GET /kv_event_sources`, as vLLM ≥ 0.31 serves them).
#[derive(Clone)]
pub struct EngineFacade {
    /// Prometheus text appended to `/metrics`.
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// `{dp_rank: {endpoint, replay_endpoint, topic, …}}`.
    pub kv_event_sources: Value,
}

impl Frontend {
    /// A frontend serving `model` through `backend`; metrics go to `registry`.
    pub fn new(
        model: impl Into<String>,
        pre: Arc<Preprocessor>,
        backend: Backend,
        registry: Registry,
        prefill: Option<(PrefillClient, bool)>,
    ) -> prometheus::Result<Arc<Self>> {
        let metrics = FrontendMetrics::new(&registry)?;
        let model: String = model.into();
        metrics
            .model_context_length
            .with_label_values(&[model.as_str()])
            .set(i64::from(pre.context_length()));
        metrics.output_tokens.with_label_values(&[model.as_str()]);
        metrics.disconnected.with_label_values(&[model.as_str()]);
        registry.register(Box::new(pre.prompt_cache_hits()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Arc::new(Self {
            model,
            pre,
            backend,
            registry,
            metrics,
            created: now.as_secs(),
            started: std::time::Instant::now(),
            ids: AtomicU64::new(1),
            salt: (now.as_nanos() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            prefill,
            cut: tokio_util::sync::CancellationToken::new(),
            tokenizing: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            ),
            facade: parking_lot::RwLock::new(None),
            reasoning: parking_lot::RwLock::new(None),
        }))
    }

    /// Makes this frontend look like an engine from outside (see [`EngineFacade`]).
    pub fn set_engine_facade(&self, facade: EngineFacade) {
        *self.facade.write() = Some(facade);
    }

    /// Splits chat answers rendered here (mock and token-level workers) into
    /// `reasoning_content` and `content` (`--dyn-reasoning-parser`).
    pub fn set_reasoning_parser(&self, format: Option<crate::reasoning::ReasoningFormat>) {
        *self.reasoning.write() = format;
    }

    pub(crate) fn reasoning_parser(&self) -> Option<crate::reasoning::ReasoningFormat> {
        *self.reasoning.read()
    }

    /// The model served.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The worker pool, when it routes to kvrouter workers.
    pub fn pool(&self) -> Option<&Arc<WorkerPool>> {
        match &self.backend {
            Backend::Workers(p) => Some(p),
            Backend::Engines(_) => None,
        }
    }

    /// What it routes to.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The router.
    pub fn router(&self) -> &Arc<KvRouter> {
        self.backend.router()
    }

    /// Seconds since the frontend started.
    pub(crate) fn uptime(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub(crate) fn metrics(&self) -> &FrontendMetrics {
        &self.metrics
    }

    /// Runs `f` (templating and tokenizing) for a request of `bytes`: inline
    /// when small, else on the blocking pool, at most one per core at a time,
    /// so big prompts neither stall the async threads (`/live`, small
    /// requests) nor oversubscribe the cores.
    pub(crate) async fn preprocess<T: Send + 'static>(
        &self,
        bytes: usize,
        f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        if bytes < INLINE_PREPROCESS_BYTES {
            return f();
        }
        let _turn = self
            .tokenizing
            .acquire()
            .await
            .map_err(|_| ApiError::shutting_down())?;
        tokio::task::spawn_blocking(f)
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(format!("preprocessing failed: {e}"))))
    }

    pub(crate) fn next_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:016x}{n:08x}", self.salt)
    }
}

/// Requests smaller than this are templated and tokenized on the async thread:
/// a few hundred microseconds at most, less than a hand-off to another thread.
const INLINE_PREPROCESS_BYTES: usize = 32 << 10;

/// Seconds since the Unix epoch (each response's `created`).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The HTTP application.
pub fn app(state: Arc<Frontend>, endpoints: HttpOptions) -> Router {
    let mut r = Router::new()
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/metrics", get(metrics))
        .route("/busy_threshold", get(get_busy).post(set_busy))
        .route("/router/state", get(router_state))
        .route("/kv_event_sources", get(kv_event_sources));
    if endpoints.chat {
        r = r.route("/v1/chat/completions", post(chat));
    }
    if endpoints.completions {
        r = r.route("/v1/completions", post(completions));
    }
    r.fallback(not_found).with_state(state)
}
