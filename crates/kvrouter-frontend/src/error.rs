//! The HTTP edge's one error type, rendered as OpenAI error JSON
//! (`{"error":{"message","type","param","code"}}`) with the right status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kvrouter_router::{GenerateError, RouteError};
use serde_json::json;

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI error type.
    pub kind: &'static str,
    /// The offending parameter, if one.
    pub param: Option<String>,
    /// Machine-readable code.
    pub code: &'static str,
}

impl ApiError {
    /// 400: the request is malformed or invalid.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: "invalid_request",
        }
    }

    /// 404: no such model.
    pub fn unknown_model(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: "model_not_found",
        }
    }

    /// 400: prompt (plus output) longer than the context.
    pub fn context_exceeded(context: u32, prompt: usize, max_tokens: Option<u32>) -> Self {
        let message = match max_tokens {
            Some(m) => format!(
                "This model's maximum context length is {context} tokens. However, you requested \
                 {} tokens ({prompt} in the messages, {m} in the completion).",
                prompt + m as usize
            ),
            None => format!(
                "This model's maximum context length is {context} tokens. However, your prompt \
                 has {prompt} tokens."
            ),
        };
        Self {
            status: StatusCode::BAD_REQUEST,
            message,
            kind: "invalid_request_error",
            param: Some("messages".into()),
            code: "context_length_exceeded",
        }
    }

    /// 500: something failed inside.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "internal_error",
            param: None,
            code: "internal_error",
        }
    }

    /// An error the HTTP edge itself answers (timeouts, limits, methods,
    /// shutdown): the OpenAI type and code follow from the status.
    pub fn edge(status: StatusCode, message: impl Into<String>) -> Self {
        let (kind, code) = match status.as_u16() {
            404 => ("invalid_request_error", "not_found"),
            405 => ("invalid_request_error", "method_not_allowed"),
            408 => ("invalid_request_error", "request_timeout"),
            413 => ("invalid_request_error", "request_too_large"),
            414 => ("invalid_request_error", "uri_too_long"),
            415 => ("invalid_request_error", "unsupported_media_type"),
            431 => ("invalid_request_error", "headers_too_large"),
            503 => ("service_unavailable", "service_unavailable"),
            504 => ("timeout", "timeout"),
            400..=499 => ("invalid_request_error", "invalid_request"),
            _ => ("internal_error", "internal_error"),
        };
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code,
        }
    }

    /// 503: the server is shutting down and the request could not finish in the grace period.
    pub fn shutting_down() -> Self {
        Self::edge(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down; the request did not finish within the grace period (--graceful-shutdown-timeout)",
        )
    }

    /// 504: the request ran out of time.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::edge(StatusCode::GATEWAY_TIMEOUT, message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }})
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let (status, kind, code) = match &e {
            RouteError::NoWorkers => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "no_workers",
            ),
            RouteError::AllWorkersBusy(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "all_workers_busy",
            ),
            RouteError::Invalid(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
        };
        Self {
            status,
            message: e.to_string(),
            kind,
            param: None,
            code,
        }
    }
}

impl From<GenerateError> for ApiError {
    fn from(e: GenerateError) -> Self {
        match e {
            GenerateError::Route(r) => r.into(),
            // The worker's typed error decides the status.
            GenerateError::Upstream {
                source: kvrouter_runtime::request::RequestError::Remote(m),
                ..
            } => kvrouter_core::error::UpstreamError::from_wire(&m).into(),
            other => Self {
                status: StatusCode::BAD_GATEWAY,
                message: other.to_string(),
                kind: "upstream_error",
                param: None,
                code: "worker_failed",
            },
        }
    }
}

impl From<kvrouter_engines::UpstreamError> for ApiError {
    fn from(e: kvrouter_engines::UpstreamError) -> Self {
        use kvrouter_engines::error::ErrorCode;
        let (status, kind, code) = match (e.blame, e.code) {
            (kvrouter_engines::Blame::Client, _) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
            (_, ErrorCode::Timeout) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                "engine_timeout",
            ),
            (_, ErrorCode::Unreachable) => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "engine_unreachable",
            ),
            (_, ErrorCode::WorkerFailed) => {
                (StatusCode::BAD_GATEWAY, "upstream_error", "worker_failed")
            }
            _ => (StatusCode::BAD_GATEWAY, "upstream_error", "engine_failed"),
        };
        Self {
            status,
            message: e.message,
            kind,
            param: None,
            code,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}
