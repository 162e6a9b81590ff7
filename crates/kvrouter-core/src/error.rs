//! One error for everything that crosses a process or engine boundary: a
//! machine-readable code, a message, whether another worker may be tried,
//! and who is to blame. Workers, routers and engine adapters produce it; the
//! request plane carries it as its JSON ([`UpstreamError::to_wire`]); the
//! frontend chooses the HTTP status from it, once.

use serde::{Deserialize, Serialize};

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Blame {
    /// The request is wrong (a 4xx for the client).
    Client,
    /// The engine failed or could not be reached (a 502/503).
    Engine,
    /// The router itself (a 500).
    Router,
}

/// What went wrong, for machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is invalid for the engine.
    InvalidRequest,
    /// Nothing was sent: the engine refused or dropped the connection.
    Unreachable,
    /// The engine did not answer in time.
    Timeout,
    /// The engine failed after the answer had started.
    FailedMidStream,
    /// The engine answered something that is not what its API promises.
    Protocol,
    /// The engine answered 5xx.
    EngineError,
    /// No worker is available.
    NoWorkers,
    /// Every worker is over a busy threshold.
    AllWorkersBusy,
    /// A worker failed (behind a router).
    WorkerFailed,
}

impl ErrorCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unreachable => "unreachable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::FailedMidStream => "failed_mid_stream",
            ErrorCode::Protocol => "protocol",
            ErrorCode::EngineError => "engine_error",
            ErrorCode::NoWorkers => "no_workers",
            ErrorCode::AllWorkersBusy => "all_workers_busy",
            ErrorCode::WorkerFailed => "worker_failed",
        }
    }
}

/// A failure at an engine boundary (JSON: `{"code","message","retryable","blame"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct UpstreamError {
    /// What went wrong.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// Another worker may be tried (nothing reached the client yet).
    pub retryable: bool,
    /// Who is to blame.
    pub blame: Blame,
}

impl UpstreamError {
    /// Nothing was sent; another engine may serve the request.
    pub fn unreachable(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Unreachable,
            message: message.into(),
            retryable: true,
            blame: Blame::Engine,
        }
    }

    /// The engine failed once the answer had started.
    pub fn mid_stream(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::FailedMidStream,
            message: message.into(),
            retryable: false,
            blame: Blame::Engine,
        }
    }

    /// The engine (or a worker) rejected the request as invalid.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidRequest,
            message: message.into(),
            retryable: false,
            blame: Blame::Client,
        }
    }

    /// The engine answered what its protocol does not allow.
    pub fn protocol(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Protocol,
            message: message.into(),
            retryable: false,
            blame: Blame::Engine,
        }
    }

    /// A router-side refusal (no worker, all busy) or a worker's failure.
    pub fn router(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retryable: false,
            blame: if code == ErrorCode::WorkerFailed {
                Blame::Engine
            } else {
                Blame::Router
            },
        }
    }

    /// As the request plane carries it: the JSON object.
    pub fn to_wire(&self) -> String {
        serde_json::to_string(self).expect("errors serialize")
    }

    /// From the request plane. A peer that predates typed errors sends a
    /// bare message (or `{"code","message"}`); the worker convention that a
    /// client's error starts with "invalid request" is read here, and only
    /// here, for them.
    pub fn from_wire(s: &str) -> Self {
        if let Ok(e) = serde_json::from_str::<UpstreamError>(s) {
            return e;
        }
        #[derive(Deserialize)]
        struct Legacy {
            code: String,
            message: String,
        }
        if let Ok(l) = serde_json::from_str::<Legacy>(s) {
            let code = match l.code.as_str() {
                "invalid_request" => return Self::invalid(l.message),
                "no_workers" => ErrorCode::NoWorkers,
                "all_workers_busy" => ErrorCode::AllWorkersBusy,
                _ => ErrorCode::WorkerFailed,
            };
            return Self::router(code, l.message);
        }
        if s.starts_with("invalid request") {
            Self::invalid(s)
        } else {
            Self::router(ErrorCode::WorkerFailed, s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let e = UpstreamError::unreachable("connection refused");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": "unreachable", "message": "connection refused",
                               "retryable": true, "blame": "engine"})
        );
        assert_eq!(serde_json::from_value::<UpstreamError>(v).unwrap(), e);
        assert_eq!(e.code.as_str(), "unreachable");
    }

    #[test]
    fn wire_form_and_older_peers() {
        let e = UpstreamError::invalid("the prompt is empty");
        assert_eq!(UpstreamError::from_wire(&e.to_wire()), e);
        let legacy = UpstreamError::from_wire("invalid request: empty prompt");
        assert_eq!(legacy.blame, Blame::Client);
        let failed = UpstreamError::from_wire("the engine dropped the request");
        assert_eq!(
            (failed.code, failed.blame),
            (ErrorCode::WorkerFailed, Blame::Engine)
        );
        let busy = UpstreamError::from_wire(r#"{"code":"all_workers_busy","message":"busy"}"#);
        assert_eq!(
            (busy.code, busy.blame),
            (ErrorCode::AllWorkersBusy, Blame::Router)
        );
    }
}
