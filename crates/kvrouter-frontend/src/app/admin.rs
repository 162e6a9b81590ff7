//! Admin and discovery routes: health and liveness, the model list, Prometheus
//! metrics, the busy thresholds (read and set), the router's state and the
//! KV-event sources an engine facade advertises.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kvrouter_core::busy::LoadThresholds;
use kvrouter_router::metrics::{PROMETHEUS_CONTENT_TYPE, prometheus_text};
use kvrouter_runtime::endpoint::WorkerMetadata;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::openai::{self};

use super::{Backend, Frontend};

pub(super) async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint".into(),
        kind: "invalid_request_error",
        param: None,
        code: "not_found",
    }
}

pub(super) async fn kv_event_sources(State(s): State<Arc<Frontend>>) -> Response {
    let sources = s.facade.read().as_ref().map(|f| f.kv_event_sources.clone());
    match sources {
        Some(v) => axum::Json(v).into_response(),
        None => not_found().await.into_response(),
    }
}

pub(super) async fn live() -> impl IntoResponse {
    axum::Json(json!({"status": "live"}))
}

pub(super) async fn health(State(s): State<Arc<Frontend>>) -> Response {
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

pub(super) async fn models(State(s): State<Arc<Frontend>>) -> impl IntoResponse {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": s.model, "object": "model", "created": s.created, "owned_by": "kvrouter"}],
    }))
}

pub(super) async fn metrics(State(s): State<Arc<Frontend>>) -> Response {
    // Model gauges are computed from what the workers declared, at scrape time.
    let metas: Vec<WorkerMetadata> = match &s.backend {
        Backend::Workers(pool) => pool.worker_metadata(),
        Backend::Engines(_) => Vec::new(),
    };
    let m = &s.metrics;
    let model = [s.model.as_str()];
    m.uptime.set(s.uptime());
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
    let mut buf = match prometheus_text(&s.registry) {
        Ok(b) => b,
        Err(e) => return ApiError::internal(format!("metrics encoding: {e}")).into_response(),
    };
    let facade = s.facade.read().clone();
    if let Some(f) = facade {
        buf.extend_from_slice((f.metrics)().as_bytes());
    }
    (
        [(axum::http::header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        buf,
    )
        .into_response()
}

pub(super) fn thresholds_json(model: &str, t: &LoadThresholds) -> Value {
    json!({
        "model": model,
        "active_decode_blocks_threshold": t.active_decode_blocks_threshold,
        "active_prefill_tokens_threshold": t.active_prefill_tokens_threshold,
        "active_prefill_tokens_threshold_frac": t.active_prefill_tokens_threshold_frac,
    })
}

pub(super) async fn get_busy(State(s): State<Arc<Frontend>>) -> impl IntoResponse {
    let t = s.router().thresholds();
    axum::Json(json!({"thresholds": [thresholds_json(&s.model, &t)]}))
}

pub(super) async fn set_busy(
    State(s): State<Arc<Frontend>>,
    body: Bytes,
) -> Result<Response, ApiError> {
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

pub(super) async fn router_state(State(s): State<Arc<Frontend>>) -> impl IntoResponse {
    let r = s.router();
    axum::Json(json!({
        "model": s.model,
        "router_mode": r.mode().as_str(),
        "block_size": r.block_size(),
        "indexed_blocks": r.index_size(),
        "workers": r.state(),
    }))
}
