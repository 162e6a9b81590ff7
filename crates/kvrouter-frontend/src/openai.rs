//! OpenAI request bodies, their validation, and the tokenized request they
//! become. Unknown fields are accepted and ignored, as OpenAI-compatible
//! servers do, so official clients work unchanged; known fields with wrong
//! types or out-of-range values are rejected with a 400 naming the field.

use kvrouter_core::RouterConfigOverride;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// `stop`: one string or up to four.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// NVIDIA extensions (`nvext`), as Dynamo accepts them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NvExt {
    /// Generate to `max_tokens` regardless of end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Agent hints (`osl`: expected output length).
    #[serde(default)]
    pub agent_hints: Option<Value>,
    /// Per-request router configuration.
    #[serde(default)]
    pub router_config_override: Option<RouterConfigOverride>,
    /// Send the request to this worker.
    #[serde(default)]
    pub backend_instance_id: Option<u64>,
}

/// Fields shared by both endpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct Common {
    /// Model name.
    pub model: String,
    /// Generate at most this many tokens.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Stream as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Put the generated token ids in each completion chunk (vLLM's extension).
    #[serde(default)]
    pub return_token_ids: Option<bool>,
    /// Sampling temperature (0–2).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass (0–1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Choices to generate (only 1).
    #[serde(default)]
    pub n: Option<u32>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Minimum tokens before an end-of-sequence may stop generation.
    #[serde(default)]
    pub min_tokens: Option<u32>,
    /// Ignore end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// NVIDIA extensions.
    #[serde(default)]
    pub nvext: Option<NvExt>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// Shared fields.
    #[serde(flatten)]
    pub common: Common,
    /// The conversation.
    pub messages: Vec<Value>,
    /// Replaces `max_tokens` in newer clients.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Tool definitions, passed to the chat template.
    #[serde(default)]
    pub tools: Option<Value>,
}

/// `POST /v1/completions` prompt: text, texts, tokens or token lists.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// Several texts (one supported).
    Texts(Vec<String>),
    /// Several token lists (one supported).
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Shared fields.
    #[serde(flatten)]
    pub common: Common,
    /// The prompt.
    pub prompt: Prompt,
}

/// Known fields and the JSON kinds they take, checked before typed parsing so
/// a wrong type is reported by field name (serde's messages give only a column).
const FIELD_KINDS: &[(&str, &str)] = &[
    ("model", "string"),
    ("messages", "array"),
    ("max_tokens", "uint"),
    ("max_completion_tokens", "uint"),
    ("n", "uint"),
    ("seed", "uint"),
    ("min_tokens", "uint"),
    ("temperature", "number"),
    ("top_p", "number"),
    ("stream", "bool"),
    ("ignore_eos", "bool"),
    ("stream_options", "object"),
    ("return_token_ids", "bool"),
    ("nvext", "object"),
];

fn check_kinds(v: &Value) -> Result<(), ApiError> {
    let Some(obj) = v.as_object() else {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    };
    for (name, kind) in FIELD_KINDS {
        let Some(x) = obj.get(*name) else { continue };
        let ok = x.is_null()
            || match *kind {
                "string" => x.is_string(),
                "array" => x.is_array(),
                "uint" => x.is_u64(),
                "number" => x.is_number(),
                "bool" => x.is_boolean(),
                _ => x.is_object(),
            };
        if !ok {
            let want = match *kind {
                "uint" => "a non-negative integer",
                "number" => "a number",
                "bool" => "a boolean",
                "string" => "a string",
                "array" => "an array",
                _ => "an object",
            };
            return Err(ApiError::invalid(
                format!("`{name}` must be {want}, got {x}"),
                Some(name),
            ));
        }
    }
    Ok(())
}

/// Parses a body, mapping serde's message to a 400.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid("the request body is empty", None));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))?;
    check_kinds(&v)?;
    serde_json::from_value(v).map_err(typed_error)
}

fn typed_error(e: serde_json::Error) -> ApiError {
    let msg = e.to_string();
    let param = msg
        .strip_prefix("missing field `")
        .and_then(|r| r.split('`').next())
        .map(str::to_string);
    ApiError::invalid(format!("invalid request body: {msg}"), param.as_deref())
}

/// Parses a request kvrouter answers itself (mock or token-level workers):
/// as [`parse`], and a field it would otherwise accept and ignore is refused,
/// by name. (Requests for engines are forwarded, and the engine decides.)
pub fn parse_for_generation<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value = parse(body)?;
    refuse_unsupported(&v)?;
    serde_json::from_value(v).map_err(typed_error)
}

/// Fields kvrouter's own generation does not implement, when set to
/// something other than their "off" value.
fn refuse_unsupported(v: &Value) -> Result<(), ApiError> {
    let off = |x: &Value| {
        x.is_null() || x == &Value::Bool(false) || x.as_u64() == Some(0) || x.as_str() == Some("")
    };
    let empty = |x: &Value| x.as_object().is_some_and(serde_json::Map::is_empty);
    for name in ["logprobs", "top_logprobs", "echo", "suffix", "logit_bias"] {
        if let Some(x) = v.get(name).filter(|x| !off(x) && !empty(x)) {
            return Err(ApiError::invalid(
                format!("`{name}` is not supported by this server (got {x})"),
                Some(name),
            ));
        }
    }
    if let Some(b) = v.get("best_of").and_then(Value::as_u64)
        && b > 1
    {
        return Err(ApiError::invalid(
            format!("`best_of` must be 1 (got {b}): one candidate per request is supported"),
            Some("best_of"),
        ));
    }
    if let Some(f) = v.get("response_format")
        && !f.is_null()
        && f.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(ApiError::invalid(
            format!("`response_format` {f} is not supported: only {{\"type\": \"text\"}}"),
            Some("response_format"),
        ));
    }
    // A tool_choice naming a function must name one of `tools`.
    if let Some(name) = v
        .pointer("/tool_choice/function/name")
        .and_then(Value::as_str)
    {
        let defined = v.get("tools").and_then(Value::as_array).is_some_and(|t| {
            t.iter()
                .any(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name))
        });
        if !defined {
            return Err(ApiError::invalid(
                format!("`tool_choice` names the function `{name}`, which `tools` does not define"),
                Some("tool_choice"),
            ));
        }
    }
    Ok(())
}

/// Range checks every endpoint shares.
pub fn validate(c: &Common, max_tokens: Option<u32>) -> Result<(), ApiError> {
    if c.model.is_empty() {
        return Err(ApiError::invalid(
            "`model` must not be empty",
            Some("model"),
        ));
    }
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(
            "`max_tokens` must be at least 1",
            Some("max_tokens"),
        ));
    }
    if let Some(t) = c.temperature
        && !(t.is_finite() && (0.0..=2.0).contains(&t))
    {
        return Err(ApiError::invalid(
            format!("`temperature` must be between 0 and 2, got {t}"),
            Some("temperature"),
        ));
    }
    if let Some(p) = c.top_p
        && !(p.is_finite() && p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::invalid(
            format!("`top_p` must be in (0, 1], got {p}"),
            Some("top_p"),
        ));
    }
    if let Some(n) = c.n
        && n != 1
    {
        return Err(ApiError::invalid(
            format!("`n` must be 1 (got {n}): one choice per request is supported"),
            Some("n"),
        ));
    }
    if let Some(Stop::Many(v)) = &c.stop
        && v.len() > 4
    {
        return Err(ApiError::invalid(
            "`stop` takes at most 4 sequences",
            Some("stop"),
        ));
    }
    if let Some(o) = c
        .nvext
        .as_ref()
        .and_then(|n| n.router_config_override.as_ref())
        && let Some(e) = o.validate().into_iter().next()
    {
        return Err(ApiError::invalid(
            format!(
                "nvext.router_config_override.{}: {}",
                e.fields.join(","),
                e.message
            ),
            Some("nvext"),
        ));
    }
    Ok(())
}

impl Common {
    /// Stop strings as a list.
    pub fn stop_strings(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }
}

/// Checks chat messages: each an object with a `role` and text `content`
/// (a string, or a list of `{"type":"text","text":...}` parts, which are
/// joined so every chat template sees a string).
pub fn normalise_messages(messages: &[Value]) -> Result<Value, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must hold at least one message",
            Some("messages"),
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            return Err(ApiError::invalid(
                format!("messages[{i}] must be an object"),
                Some("messages"),
            ));
        };
        let role = obj.get("role").and_then(Value::as_str).unwrap_or_default();
        if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(ApiError::invalid(
                format!("messages[{i}].role must be system, developer, user, assistant or tool"),
                Some("messages"),
            ));
        }
        let content = match obj.get("content") {
            None | Some(Value::Null) if role == "assistant" => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content: only text parts are supported"),
                                Some("messages"),
                            ));
                        }
                    }
                }
                text
            }
            _ => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content must be a string or a list of text parts"),
                    Some("messages"),
                ));
            }
        };
        let mut m = obj.clone();
        m.insert("content".into(), Value::String(content));
        out.push(Value::Object(m));
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvext_override_survives_parsing() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"x"}],
            "nvext":{"router_config_override":{"overlap_score_weight":0.0,"assume_kv_reuse":false}}}"#;
        let r: ChatRequest = parse(body).unwrap();
        let o = r.common.nvext.unwrap().router_config_override.unwrap();
        assert_eq!(o.overlap_score_weight, Some(0.0));
        assert_eq!(o.assume_kv_reuse, Some(false));
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = parse::<ChatRequest>(br#"{"model":"m","messages":[],"max_tokens":"many"}"#)
            .unwrap_err();
        assert!(e.message.contains("`max_tokens`"), "{}", e.message);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = parse::<ChatRequest>(b"[1]").unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
    }
}
