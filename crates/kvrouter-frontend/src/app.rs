//! The axum application: OpenAI endpoints, health, metrics and the busy
//! threshold admin endpoint, over one model served by a [`WorkerPool`].
//!
//! A request is parsed and validated, templated and tokenized, checked
//! against the context length, routed (the router tracks it from here), and
//! streamed back — as server-sent events ending in `data: [DONE]`, or
//! collected into one JSON body. The routed stream is owned by the response:
//! when the client disconnects, axum drops it, which cancels the worker's
//! request and frees it in the router.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use kvrouter_core::busy::LoadThresholds;
use kvrouter_core::llm::{
    FinishReason, PreprocessedRequest, RoutingHints, SamplingOptions, StopConditions,
};
use kvrouter_router::disagg::PrefillClient;
use kvrouter_router::engines::EnginePool;
use kvrouter_router::{GenerateStream, KvRouter, WorkerPool};
use kvrouter_runtime::endpoint::WorkerMetadata;
use prometheus::{Encoder, Registry, TextEncoder};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::metrics::FrontendMetrics;
use crate::openai::{self, ChatRequest, Common, CompletionRequest, Prompt};
use crate::stop::StopMatcher;
use crate::tokenizer::{Detokenizer, Preprocessor};

/// Which OpenAI endpoints are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// `/v1/chat/completions`.
    pub chat: bool,
    /// `/v1/completions`.
    pub completions: bool,
}

impl Default for Endpoints {
    fn default() -> Self {
        Self {
            chat: true,
            completions: true,
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
    ids: AtomicU64,
    salt: u64,
    /// Disaggregated serving: the prefill pool's router, and whether it is required.
    prefill: Option<(PrefillClient, bool)>,
    /// Set when this frontend stands in for an engine (`kvrouter mocker --openai-port`).
    facade: parking_lot::RwLock<Option<EngineFacade>>,
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
        registry.register(Box::new(pre.prompt_cache_hits()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Arc::new(Self {
            model: model.into(),
            pre,
            backend,
            registry,
            metrics,
            created: now.as_secs(),
            ids: AtomicU64::new(1),
            salt: (now.as_nanos() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            prefill,
            facade: parking_lot::RwLock::new(None),
        }))
    }

    /// Makes this frontend look like an engine from outside (see [`EngineFacade`]).
    pub fn set_engine_facade(&self, facade: EngineFacade) {
        *self.facade.write() = Some(facade);
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

    pub(crate) fn metrics(&self) -> &FrontendMetrics {
        &self.metrics
    }

    pub(crate) fn next_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:016x}{n:08x}", self.salt)
    }
}

/// The HTTP application.
pub fn app(state: Arc<Frontend>, endpoints: Endpoints) -> Router {
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

/// Serves `app` on `listener` until `shutdown` resolves.
pub async fn run(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Streamed responses are many small writes: without TCP_NODELAY, Nagle's
    // algorithm meets the client's delayed ACK and adds ~40 ms per response.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint".into(),
        kind: "invalid_request_error",
        param: None,
        code: "not_found",
    }
}

async fn kv_event_sources(State(s): State<Arc<Frontend>>) -> Response {
    let sources = s.facade.read().as_ref().map(|f| f.kv_event_sources.clone());
    match sources {
        Some(v) => axum::Json(v).into_response(),
        None => not_found().await.into_response(),
    }
}

async fn live() -> impl IntoResponse {
    axum::Json(json!({"status": "live"}))
}

async fn health(State(s): State<Arc<Frontend>>) -> Response {
    let (instances, up): (Vec<Value>, usize) = match &s.backend {
        Backend::Workers(pool) => {
            let v: Vec<Value> = pool
                .instances()
                .iter()
                .map(|i| json!({"instance_id": i.id, "endpoint": i.endpoint, "address": i.address}))
                .collect();
            let n = v.len();
            (v, n)
        }
        Backend::Engines(engines) => {
            let infos = engines.engines();
            let n = infos.iter().filter(|e| e.healthy).count();
            (infos.iter().map(|e| json!(e)).collect(), n)
        }
    };
    let (status, word) = if up == 0 {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    } else {
        (StatusCode::OK, "healthy")
    };
    (
        status,
        axum::Json(json!({"status": word, "models": [s.model], "instances": instances})),
    )
        .into_response()
}

async fn models(State(s): State<Arc<Frontend>>) -> impl IntoResponse {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": s.model, "object": "model", "created": s.created, "owned_by": "kvrouter"}],
    }))
}

async fn metrics(State(s): State<Arc<Frontend>>) -> Response {
    // Model gauges are computed from what the workers declared, at scrape time.
    let metas: Vec<WorkerMetadata> = match &s.backend {
        Backend::Workers(pool) => pool
            .instances()
            .iter()
            .filter_map(|i| serde_json::from_value(i.metadata.clone()).ok())
            .collect(),
        Backend::Engines(_) => Vec::new(),
    };
    let m = &s.metrics;
    let model = [s.model.as_str()];
    m.model_workers
        .with_label_values(&model)
        .set(metas.len() as i64);
    m.model_total_kv_blocks.with_label_values(&model).set(
        metas
            .iter()
            .map(|w| (w.total_kv_blocks * u64::from(w.data_parallel_size.max(1))) as i64)
            .sum(),
    );
    if let Some(w) = metas.first() {
        m.model_max_num_seqs
            .with_label_values(&model)
            .set(w.max_num_seqs as i64);
        m.model_max_num_batched_tokens
            .with_label_values(&model)
            .set(w.max_num_batched_tokens as i64);
        m.model_block_size
            .with_label_values(&model)
            .set(i64::from(w.block_size));
    }
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&s.registry.gather(), &mut buf) {
        return ApiError::internal(format!("metrics encoding: {e}")).into_response();
    }
    let facade = s.facade.read().clone();
    if let Some(f) = facade {
        buf.extend_from_slice((f.metrics)().as_bytes());
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        buf,
    )
        .into_response()
}

fn thresholds_json(model: &str, t: &LoadThresholds) -> Value {
    json!({
        "model": model,
        "active_decode_blocks_threshold": t.active_decode_blocks_threshold,
        "active_prefill_tokens_threshold": t.active_prefill_tokens_threshold,
        "active_prefill_tokens_threshold_frac": t.active_prefill_tokens_threshold_frac,
    })
}

async fn get_busy(State(s): State<Arc<Frontend>>) -> impl IntoResponse {
    let t = s.router().thresholds();
    axum::Json(json!({"thresholds": [thresholds_json(&s.model, &t)]}))
}

async fn set_busy(State(s): State<Arc<Frontend>>, body: Bytes) -> Result<Response, ApiError> {
    let v: Value = openai::parse(&body)?;
    let Some(obj) = v.as_object() else {
        return Err(ApiError::invalid("the body must be a JSON object", None));
    };
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("`model` is required", Some("model")))?;
    if model != s.model {
        return Err(ApiError::unknown_model(model));
    }
    let router = s.router();
    let mut t = router.thresholds();
    // A field set to null clears that threshold; an absent field keeps it.
    let float = |k: &str| -> Result<Option<Option<f64>>, ApiError> {
        match obj.get(k) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(v) => v.as_f64().map(|f| Some(Some(f))).ok_or_else(|| {
                ApiError::invalid(format!("`{k}` must be a number or null"), Some(k))
            }),
        }
    };
    if let Some(v) = float("active_decode_blocks_threshold")? {
        t.active_decode_blocks_threshold = v;
    }
    if let Some(v) = float("active_prefill_tokens_threshold_frac")? {
        t.active_prefill_tokens_threshold_frac = v;
    }
    match obj.get("active_prefill_tokens_threshold") {
        None => {}
        Some(Value::Null) => t.active_prefill_tokens_threshold = None,
        Some(v) => {
            t.active_prefill_tokens_threshold = Some(v.as_u64().ok_or_else(|| {
                ApiError::invalid(
                    "`active_prefill_tokens_threshold` must be a non-negative integer or null",
                    Some("active_prefill_tokens_threshold"),
                )
            })?);
        }
    }
    if let Some(e) = t.validate().into_iter().next() {
        return Err(ApiError::invalid(
            format!("{}: {}", e.fields.join(", "), e.message),
            e.fields.first().copied(),
        ));
    }
    router.set_thresholds(t);
    tracing::info!(?t, "busy thresholds changed");
    Ok(axum::Json(thresholds_json(&s.model, &t)).into_response())
}

async fn router_state(State(s): State<Arc<Frontend>>) -> impl IntoResponse {
    let r = s.router();
    axum::Json(json!({
        "model": s.model,
        "router_mode": r.mode().as_str(),
        "block_size": r.block_size(),
        "indexed_blocks": r.index_size(),
        "workers": r.state(),
    }))
}

/// What both endpoints produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

impl Kind {
    pub(crate) fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "chat_completions",
            Kind::Completion => "completions",
        }
    }
}

/// A validated request, tokenized.
struct Job {
    kind: Kind,
    stream: bool,
    return_token_ids: bool,
    include_usage: bool,
    stops: Vec<String>,
    request: PreprocessedRequest,
}

/// vLLM's header pinning a data-parallel rank.
const DP_RANK_HEADER: &str = "x-data-parallel-rank";

pub(crate) fn header_dp_rank(headers: &HeaderMap) -> Result<Option<u32>, ApiError> {
    let Some(v) = headers.get(DP_RANK_HEADER) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid(
                format!("the {DP_RANK_HEADER} header must be a rank number"),
                None,
            )
        })
}

async fn chat(State(s): State<Arc<Frontend>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Backend::Engines(e) = &s.backend {
        let e = e.clone();
        return crate::passthrough::forward(s, &e, Kind::Chat, headers, body).await;
    }
    let started = Instant::now();
    let job = (|| {
        let dp_rank = header_dp_rank(&headers)?;
        let req: ChatRequest = openai::parse(&body)?;
        let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
        openai::validate(&req.common, max_tokens)?;
        check_model(&s, &req.common.model)?;
        let messages = openai::normalise_messages(&req.messages)?;
        let t = Instant::now();
        let prompt = s
            .pre
            .render_chat(&messages, req.tools.as_ref())
            .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
        let tokens = s
            .pre
            .encode(&prompt)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        s.metrics.preprocessing.observe(t.elapsed().as_secs_f64());
        job(&s, Kind::Chat, &req.common, max_tokens, tokens, dp_rank)
    })();
    respond(s, Kind::Chat, job, started).await
}

async fn completions(State(s): State<Arc<Frontend>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Backend::Engines(e) = &s.backend {
        let e = e.clone();
        return crate::passthrough::forward(s, &e, Kind::Completion, headers, body).await;
    }
    let started = Instant::now();
    let job = (|| {
        let dp_rank = header_dp_rank(&headers)?;
        let req: CompletionRequest = openai::parse(&body)?;
        openai::validate(&req.common, req.common.max_tokens)?;
        check_model(&s, &req.common.model)?;
        let t = Instant::now();
        let one = |n: usize| {
            if n == 1 {
                Ok(())
            } else {
                Err(ApiError::invalid(
                    format!("`prompt` holds {n} prompts; one per request is supported"),
                    Some("prompt"),
                ))
            }
        };
        let tokens = match req.prompt {
            Prompt::Text(t) => s.pre.encode(&t),
            Prompt::Texts(v) => {
                one(v.len())?;
                s.pre.encode(&v[0])
            }
            Prompt::Tokens(t) => Ok(t),
            Prompt::TokenLists(v) => {
                one(v.len())?;
                Ok(v.into_iter().next().unwrap_or_default())
            }
        }
        .map_err(|e| ApiError::internal(e.to_string()))?;
        s.metrics.preprocessing.observe(t.elapsed().as_secs_f64());
        // OpenAI's legacy default.
        let max_tokens = req.common.max_tokens.or(Some(16));
        job(
            &s,
            Kind::Completion,
            &req.common,
            max_tokens,
            tokens,
            dp_rank,
        )
    })();
    respond(s, Kind::Completion, job, started).await
}

pub(crate) fn check_model(s: &Frontend, model: &str) -> Result<(), ApiError> {
    if model == s.model {
        Ok(())
    } else {
        Err(ApiError::unknown_model(model))
    }
}

fn job(
    s: &Frontend,
    kind: Kind,
    c: &Common,
    max_tokens: Option<u32>,
    tokens: Vec<u32>,
    dp_rank: Option<u32>,
) -> Result<Job, ApiError> {
    if tokens.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    let context = s.pre.context_length();
    if tokens.len() >= context as usize
        || max_tokens.is_some_and(|m| tokens.len() + m as usize > context as usize)
    {
        return Err(ApiError::context_exceeded(
            context,
            tokens.len(),
            max_tokens,
        ));
    }
    let nvext = c.nvext.clone().unwrap_or_default();
    let extra_args = nvext
        .agent_hints
        .as_ref()
        .map(|h| json!({"agent_hints": h}));
    Ok(Job {
        kind,
        stream: c.stream.unwrap_or(false),
        return_token_ids: c.return_token_ids.unwrap_or(false),
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        stops: c.stop_strings(),
        request: PreprocessedRequest {
            model: s.model.clone(),
            token_ids: tokens,
            stop_conditions: StopConditions {
                max_tokens,
                stop: None,
                min_tokens: c.min_tokens,
                ignore_eos: c.ignore_eos.or(nvext.ignore_eos),
            },
            sampling_options: SamplingOptions {
                temperature: c.temperature,
                top_p: c.top_p,
                seed: c.seed,
            },
            eos_token_ids: s.pre.eos_token_ids().to_vec(),
            routing: (nvext.backend_instance_id.is_some() || dp_rank.is_some()).then_some(
                RoutingHints {
                    dp_rank,
                    backend_instance_id: nvext.backend_instance_id,
                },
            ),
            router_config_override: nvext.router_config_override,
            extra_args,
            ..Default::default()
        },
    })
}

/// Per-request metrics, settled when dropped (also on disconnect).
pub(crate) struct Tracker {
    s: Arc<Frontend>,
    kind: Kind,
    stream: bool,
    started: Instant,
    last: Option<Instant>,
    tokens: u32,
    pub(crate) ok: bool,
}

impl Tracker {
    pub(crate) fn new(s: Arc<Frontend>, kind: Kind, stream: bool, started: Instant) -> Self {
        let model = [s.model.as_str()];
        s.metrics.inflight.with_label_values(&model).inc();
        s.metrics.queued.with_label_values(&model).inc();
        Self {
            s,
            kind,
            stream,
            started,
            last: None,
            tokens: 0,
            ok: false,
        }
    }

    pub(crate) fn tokens(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let m = &self.s.metrics;
        let model = [self.s.model.as_str()];
        match self.last {
            None => {
                m.queued.with_label_values(&model).dec();
                m.ttft
                    .with_label_values(&model)
                    .observe((now - self.started).as_secs_f64());
            }
            Some(prev) => m
                .itl
                .with_label_values(&model)
                .observe((now - prev).as_secs_f64() / n as f64),
        }
        self.last = Some(now);
        self.tokens += n as u32;
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let m = &self.s.metrics;
        let model = [self.s.model.as_str()];
        m.inflight.with_label_values(&model).dec();
        if self.last.is_none() {
            m.queued.with_label_values(&model).dec();
        }
        m.duration
            .with_label_values(&model)
            .observe(self.started.elapsed().as_secs_f64());
        m.osl
            .with_label_values(&model)
            .observe(f64::from(self.tokens));
        let status = if self.ok { "success" } else { "error" };
        let rtype = if self.stream { "stream" } else { "unary" };
        m.requests
            .with_label_values(&[&self.s.model, self.kind.endpoint(), rtype, status])
            .inc();
    }
}

pub(crate) fn count_rejected(s: &Frontend, kind: Kind) {
    s.metrics
        .requests
        .with_label_values(&[&s.model, kind.endpoint(), "unary", "rejected"])
        .inc();
}

async fn respond(
    s: Arc<Frontend>,
    kind: Kind,
    job: Result<Job, ApiError>,
    started: Instant,
) -> Response {
    let job = match job {
        Ok(j) => j,
        Err(e) => {
            count_rejected(&s, kind);
            return e.into_response();
        }
    };
    let id = s.next_id(match job.kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    });
    let mut tracker = Tracker::new(s.clone(), job.kind, job.stream, started);
    let model = [s.model.as_str()];
    s.metrics
        .isl
        .with_label_values(&model)
        .observe(job.request.token_ids.len() as f64);
    let mut job = job;
    if let Some((prefill, required)) = &s.prefill {
        match prefill.prefill(&job.request, &id).await {
            Ok(result) => job.request.prefill_result = Some(result),
            Err(e) if *required => {
                let mut err = ApiError::from(e);
                err.status = StatusCode::SERVICE_UNAVAILABLE;
                err.message = format!(
                    "prefill via {} failed and --enforce-disagg is set: {}",
                    prefill.endpoint(),
                    err.message
                );
                return err.into_response();
            }
            Err(e) => {
                tracing::warn!(error = %e, "prefill pool unavailable; serving aggregated");
            }
        }
    }
    let routed = match &s.backend {
        Backend::Workers(pool) => pool.generate(&job.request, &id).await,
        Backend::Engines(_) => {
            return ApiError::internal("engine requests are forwarded, not generated")
                .into_response();
        }
    };
    let routed = match routed {
        Ok(r) => r,
        Err(e) => {
            tracker.ok = false;
            return ApiError::from(e).into_response();
        }
    };
    let run = Run {
        detok: s.pre.decoder(),
        stop: StopMatcher::new(job.stops.clone()),
        s: s.clone(),
        routed,
        tracker,
        id,
        prompt_tokens: job.request.token_ids.len() as u32,
        cached_tokens: 0,
        kind: job.kind,
        pending_finish: None,
        last_ids: Vec::new(),
        return_token_ids: job.return_token_ids,
    };
    if job.stream {
        stream_response(run, job.include_usage)
    } else {
        unary_response(run).await
    }
}

/// One request in flight: the routed stream and what is made of it.
struct Run {
    s: Arc<Frontend>,
    routed: GenerateStream,
    detok: Detokenizer,
    stop: StopMatcher,
    tracker: Tracker,
    id: String,
    prompt_tokens: u32,
    cached_tokens: u32,
    kind: Kind,
    /// A finish reason to report after the text already returned.
    pending_finish: Option<&'static str>,
    /// Token ids not yet sent in a chunk (`return_token_ids`).
    last_ids: Vec<u32>,
    /// Put each chunk's token ids in it (vLLM's `return_token_ids`).
    return_token_ids: bool,
}

/// One step of a run.
enum Step {
    Text(String),
    Finished(&'static str),
    Failed(ApiError),
}

impl Run {
    async fn step(&mut self) -> Step {
        match self.routed.next().await {
            None => Step::Failed(ApiError::internal(
                "the worker ended the stream without a finish reason",
            )),
            Some(Err(e)) => Step::Failed(ApiError::from(e)),
            Some(Ok(out)) => {
                // Engines reached through `kvrouter engine` may answer text without ids.
                let text_only = out.token_ids.is_empty() && out.text.is_some();
                self.tracker
                    .tokens(out.token_ids.len() + usize::from(text_only));
                // Ids wait for the chunk that carries their text (or the finish).
                self.last_ids.extend_from_slice(&out.token_ids);
                if let Some(u) = out.completion_usage
                    && let Some(d) = u.prompt_tokens_details
                {
                    self.cached_tokens = d.cached_tokens;
                }
                let mut text = String::new();
                for &t in &out.token_ids {
                    if out.finish_reason == Some(FinishReason::Eos)
                        && self.s.pre.eos_token_ids().contains(&t)
                    {
                        continue;
                    }
                    let piece = self.detok.push(t);
                    text.push_str(&self.stop.push(&piece));
                }
                if let Some(t) = out.text.as_deref().filter(|_| text_only) {
                    text.push_str(&self.stop.push(t));
                }
                if self.stop.stopped() {
                    return Step::Finished("stop");
                }
                match out.finish_reason {
                    None => Step::Text(text),
                    Some(r) => {
                        let reason = match r {
                            FinishReason::Length => "length",
                            FinishReason::Error => {
                                return Step::Failed(ApiError::internal("the worker failed"));
                            }
                            _ => "stop",
                        };
                        text.push_str(&self.stop.flush());
                        if text.is_empty() {
                            Step::Finished(reason)
                        } else {
                            // Deliver the last text first, then the finish.
                            self.pending_finish = Some(reason);
                            Step::Text(text)
                        }
                    }
                }
            }
        }
    }

    fn usage(&self) -> Value {
        let completion = self.tracker.tokens;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }

    fn finish(&mut self) {
        self.tracker.ok = true;
        let model = [self.s.model.as_str()];
        self.s
            .metrics
            .cached_tokens
            .with_label_values(&model)
            .observe(f64::from(self.cached_tokens));
    }

    fn chunk(&mut self, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        let created = self.s.created;
        match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": created,
                    "model": self.s.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
            Kind::Completion => {
                let mut choice = json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish});
                if self.return_token_ids {
                    choice["token_ids"] = json!(std::mem::take(&mut self.last_ids));
                }
                json!({
                    "id": self.id, "object": "text_completion", "created": created,
                    "model": self.s.model, "choices": [choice],
                })
            }
        }
    }
}

async fn unary_response(mut run: Run) -> Response {
    let mut text = String::new();
    let reason = loop {
        if let Some(r) = run.pending_finish.take() {
            break r;
        }
        match run.step().await {
            Step::Text(t) => text.push_str(&t),
            Step::Finished(r) => break r,
            Step::Failed(e) => return e.into_response(),
        }
    };
    run.finish();
    let choice = match run.kind {
        Kind::Chat => json!({
            "index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": null, "finish_reason": reason,
        }),
        Kind::Completion => json!({
            "index": 0, "text": text, "logprobs": null, "finish_reason": reason,
        }),
    };
    let object = match run.kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    axum::Json(json!({
        "id": run.id, "object": object, "created": run.s.created, "model": run.s.model,
        "choices": [choice], "usage": run.usage(),
        "nvext": {"worker_id": run.routed.worker_id(), "dp_rank": run.routed.dp_rank(),
                  "overlap_blocks": run.routed.overlap_blocks()},
    }))
    .into_response()
}

enum Phase {
    Start,
    Body,
    Usage,
    Done,
    End,
}

fn event(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

fn stream_response(run: Run, include_usage: bool) -> Response {
    let state = (run, Phase::Start, include_usage);
    let events = futures::stream::unfold(state, |(mut run, phase, usage)| async move {
        match phase {
            Phase::Start => {
                let first = match run.kind {
                    Kind::Chat => vec![event(&run.chunk(Some(""), true, None))],
                    Kind::Completion => Vec::new(),
                };
                Some((first, (run, Phase::Body, usage)))
            }
            Phase::Body => {
                if let Some(reason) = run.pending_finish.take() {
                    run.finish();
                    let e = vec![event(&run.chunk(None, false, Some(reason)))];
                    let next = if usage { Phase::Usage } else { Phase::Done };
                    return Some((e, (run, next, usage)));
                }
                match run.step().await {
                    Step::Text(t) if t.is_empty() => Some((Vec::new(), (run, Phase::Body, usage))),
                    Step::Text(t) => {
                        let e = vec![event(&run.chunk(Some(&t), false, None))];
                        Some((e, (run, Phase::Body, usage)))
                    }
                    Step::Finished(reason) => {
                        run.finish();
                        let e = vec![event(&run.chunk(None, false, Some(reason)))];
                        let next = if usage { Phase::Usage } else { Phase::Done };
                        Some((e, (run, next, usage)))
                    }
                    Step::Failed(err) => {
                        tracing::warn!(request_id = %run.id, error = %err.message, "stream failed");
                        Some((vec![event(&err.body())], (run, Phase::Done, usage)))
                    }
                }
            }
            Phase::Usage => {
                let mut v = run.chunk(None, false, None);
                v["choices"] = json!([]);
                v["usage"] = run.usage();
                Some((vec![event(&v)], (run, Phase::Done, usage)))
            }
            Phase::Done => Some((
                vec![Ok(Event::default().data("[DONE]"))],
                (run, Phase::End, usage),
            )),
            Phase::End => None,
        }
    })
    .flat_map(futures::stream::iter);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
