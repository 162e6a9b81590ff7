//! One error for everything that crosses a process or engine boundary: a
//! machine-readable code, a message, whether another worker may be tried,
//! and who is to blame. The frontend chooses the HTTP status from it, once.

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
}
