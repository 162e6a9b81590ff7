//! What crosses the request plane between the frontend (or a router) and an
//! engine worker: a tokenized request in, a stream of engine outputs back.
//!
//! Field names follow Dynamo's `PreprocessedRequest` / `LLMEngineOutput`
//! (reference §8) so operators and tools that know those recognise them;
//! unknown fields are ignored so newer senders keep working.

use crate::config::RouterConfigOverride;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// When generation stops.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StopConditions {
    /// Tokens to generate at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Stop strings (applied by the frontend on the text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    /// Tokens to generate before an end-of-sequence token may stop generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<u32>,
    /// Never stop at an end-of-sequence token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
}

/// How tokens are sampled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingOptions {
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Seed for reproducible sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// Where the request must go, if the caller already knows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingHints {
    /// Data-parallel rank to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_rank: Option<u32>,
    /// Worker instance to use (bypasses selection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_instance_id: Option<u64>,
}

/// A tokenized request (Dynamo's `PreprocessedRequest`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PreprocessedRequest {
    /// Model name.
    #[serde(default = "unknown_model")]
    pub model: String,
    /// The prompt's tokens.
    pub token_ids: Vec<u32>,
    /// Stop conditions.
    #[serde(default)]
    pub stop_conditions: StopConditions,
    /// Sampling options.
    #[serde(default)]
    pub sampling_options: SamplingOptions,
    /// Output options (log-probs and the like), passed through.
    #[serde(default)]
    pub output_options: Value,
    /// End-of-sequence tokens of the model.
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
    /// Annotations requested by the caller.
    #[serde(default)]
    pub annotations: Vec<String>,
    /// Routing hints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingHints>,
    /// Legacy top-level data-parallel rank (becomes `routing.dp_rank`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_rank: Option<u32>,
    /// Per-request router configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_config_override: Option<RouterConfigOverride>,
    /// Result of a remote prefill (disaggregated serving), passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_result: Option<Value>,
    /// Bootstrap information for a KV transfer, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_info: Option<Value>,
    /// Extra arguments (`ttft_target`, `itl_target`, agent hints such as `osl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_args: Option<Value>,
    /// The caller's request id (used in logs and sequence tracking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

fn unknown_model() -> String {
    "unknown".into()
}

impl PreprocessedRequest {
    /// The data-parallel rank asked for, from `routing` or the legacy field.
    pub fn dp_rank(&self) -> Option<u32> {
        self.routing
            .as_ref()
            .and_then(|r| r.dp_rank)
            .or(self.dp_rank)
    }

    /// How much earlier the router queue should rank it
    /// (`agent_hints.latency_sensitivity`, seconds).
    pub fn priority_jump(&self) -> std::time::Duration {
        let hint = self
            .extra_args
            .as_ref()
            .and_then(|v| v.pointer("/agent_hints/latency_sensitivity"));
        crate::queue::priority_jump(hint)
    }

    /// Expected output length from the agent hints (`extra_args.osl`), if given.
    pub fn expected_output_tokens(&self) -> Option<u32> {
        let v = self.extra_args.as_ref()?;
        v.get("osl")
            .or_else(|| v.pointer("/agent_hints/osl"))
            .and_then(Value::as_u64)
            .map(|n| n.min(u64::from(u32::MAX)) as u32)
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// `max_tokens` or the context was reached.
    Length,
    /// A stop condition matched.
    Stop,
    /// The engine failed.
    Error,
    /// The request was cancelled.
    Cancelled,
}

/// Prompt-token details of the usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the KV cache.
    pub cached_tokens: u32,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionUsage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Both.
    pub total_tokens: u32,
    /// Cached prompt tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// One chunk of a worker's answer (Dynamo's `LLMEngineOutput`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LlmEngineOutput {
    /// New tokens.
    #[serde(default)]
    pub token_ids: Vec<u32>,
    /// Their text pieces, if the engine detokenizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<String>>,
    /// Their text, if the engine detokenizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Cumulative log-probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cum_log_probs: Option<f64>,
    /// Per-token log-probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_probs: Option<Vec<f64>>,
    /// Top log-probabilities, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Value>,
    /// Set on the last chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    /// The stop string or token that ended generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<Value>,
    /// Choice index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// Disaggregation parameters, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disaggregated_params: Option<Value>,
    /// Extra values, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_args: Option<Value>,
    /// Usage, on the last chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_usage: Option<CompletionUsage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_legacy_fields() {
        let r: PreprocessedRequest =
            serde_json::from_str(r#"{"token_ids":[1,2,3],"dp_rank":2,"future_field":true}"#)
                .unwrap();
        assert_eq!(r.model, "unknown");
        assert_eq!(r.dp_rank(), Some(2));
        assert!(r.eos_token_ids.is_empty());
        let with_routing: PreprocessedRequest = serde_json::from_str(
            r#"{"token_ids":[1],"routing":{"dp_rank":1},"dp_rank":3,"extra_args":{"agent_hints":{"osl":40}}}"#,
        )
        .unwrap();
        assert_eq!(with_routing.dp_rank(), Some(1));
        assert_eq!(with_routing.expected_output_tokens(), Some(40));
        assert!(serde_json::from_str::<PreprocessedRequest>(r#"{"model":"m"}"#).is_err());
    }

    #[test]
    fn output_round_trip() {
        let o = LlmEngineOutput {
            token_ids: vec![5],
            finish_reason: Some(FinishReason::Length),
            completion_usage: Some(CompletionUsage {
                prompt_tokens: 10,
                completion_tokens: 1,
                total_tokens: 11,
                prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: 8 }),
            }),
            ..Default::default()
        };
        let json = serde_json::to_string(&o).unwrap();
        assert!(json.contains(r#""finish_reason":"length""#), "{json}");
        assert_eq!(serde_json::from_str::<LlmEngineOutput>(&json).unwrap(), o);
    }
}
