//! Following a forwarded OpenAI answer without touching its bytes: the first
//! chunk (prefill done), generated tokens (output blocks), usage (cached
//! tokens) and an error the engine reported inside the stream.
//!
//! Server-sent events are parsed by `eventsource-stream` from a copy of each
//! forwarded chunk, so an event split across reads is still one event. A
//! unary JSON body is kept (up to [`MAX_UNARY`]) and read once it ends. Each
//! chunk that carries text, reasoning or tool-call deltas counts as one token
//! per choice (engines stream one token per chunk); a `usage` object, when
//! present, is the final word on the counts.

use std::convert::Infallible;

use bytes::Bytes;
use eventsource_stream::{EventStream, Eventsource};
use futures::channel::mpsc;
use futures::{FutureExt, StreamExt};
use serde_json::Value;

/// Largest unary body read for its usage (a bigger one is still forwarded).
pub const MAX_UNARY: usize = 16 << 20;

/// Token counts an engine reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Prompt tokens served from the engine's prefix cache, when reported.
    pub cached_tokens: Option<u32>,
}

/// What the observer saw in a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// `n` more tokens were generated (the first observation marks prefill done).
    Tokens(usize),
    /// The engine's usage object.
    Usage(Usage),
    /// The engine reported an error inside the stream.
    Error(String),
}

enum Mode {
    Sse {
        tx: mpsc::UnboundedSender<Result<Bytes, Infallible>>,
        events: EventStream<mpsc::UnboundedReceiver<Result<Bytes, Infallible>>>,
    },
    Unary(Vec<u8>),
}

/// Reads one forwarded response (see the module docs).
pub struct Observer {
    mode: Mode,
}

fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage").filter(|u| u.is_object())?;
    let n = |k: &str| u.get(k).and_then(Value::as_u64).map(|x| x as u32);
    Some(Usage {
        prompt_tokens: n("prompt_tokens").unwrap_or(0),
        completion_tokens: n("completion_tokens").unwrap_or(0),
        cached_tokens: u
            .get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens"))
            .and_then(Value::as_u64)
            .map(|x| x as u32),
    })
}

/// A streamed chunk, as far as it is followed.
#[derive(serde::Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChunkChoice<'a>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(serde::Deserialize)]
struct ChunkChoice<'a> {
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<Vec<serde::de::IgnoredAny>>,
}

#[derive(serde::Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
}

#[derive(serde::Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
        }
    }
}

impl ChunkChoice<'_> {
    /// Whether this choice carries generated output (text, reasoning or a tool call).
    fn generated(&self) -> bool {
        let some =
            |s: &Option<std::borrow::Cow<'_, str>>| s.as_deref().is_some_and(|s| !s.is_empty());
        some(&self.text)
            || self.delta.as_ref().is_some_and(|d| {
                some(&d.content)
                    || some(&d.reasoning_content)
                    || some(&d.reasoning)
                    || d.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
            })
    }
}

impl Observer {
    /// An observer for a response of `content_type`.
    pub fn new(content_type: Option<&str>) -> Self {
        let sse = content_type.is_some_and(|c| c.starts_with("text/event-stream"));
        let mode = if sse {
            let (tx, rx) = mpsc::unbounded();
            Mode::Sse {
                tx,
                events: rx.eventsource(),
            }
        } else {
            Mode::Unary(Vec::new())
        };
        Self { mode }
    }

    /// Reads one forwarded chunk.
    pub fn push(&mut self, chunk: &Bytes) -> Vec<Observation> {
        match &mut self.mode {
            Mode::Unary(buf) => {
                if buf.len() + chunk.len() <= MAX_UNARY {
                    buf.extend_from_slice(chunk);
                }
                Vec::new()
            }
            Mode::Sse { tx, events } => {
                let _ = tx.unbounded_send(Ok(chunk.clone()));
                let mut out = Vec::new();
                // The copy is already queued: the parser answers without waiting.
                while let Some(Some(Ok(ev))) = events.next().now_or_never() {
                    if ev.data == "[DONE]" {
                        continue;
                    }
                    // Borrowed and typed: only the fields followed are read.
                    let Ok(c) = serde_json::from_str::<Chunk<'_>>(&ev.data) else {
                        continue;
                    };
                    if let Some(e) = c.error {
                        let msg = e
                            .get("message")
                            .and_then(Value::as_str)
                            .map_or_else(|| e.to_string(), str::to_string);
                        out.push(Observation::Error(msg));
                        continue;
                    }
                    let n = c.choices.iter().filter(|c| c.generated()).count();
                    if n > 0 {
                        out.push(Observation::Tokens(n));
                    }
                    if let Some(u) = c.usage {
                        out.push(Observation::Usage(u.into()));
                    }
                }
                out
            }
        }
    }

    /// At the end of the body: what a unary answer reported.
    pub fn finish(&mut self) -> Vec<Observation> {
        let Mode::Unary(buf) = &mut self.mode else {
            return Vec::new();
        };
        let Ok(v) = serde_json::from_slice::<Value>(buf) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Some(u) = usage_of(&v) {
            if u.completion_tokens > 0 {
                out.push(Observation::Tokens(u.completion_tokens as usize));
            }
            out.push(Observation::Usage(u));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_split_across_reads() {
        let mut o = Observer::new(Some("text/event-stream; charset=utf-8"));
        let whole = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
                     data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n\
                     data: {\"choices\":[{\"text\":\"lo\"}]}\n\n\
                     data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n\
                     data: [DONE]\n\n";
        let mut seen = Vec::new();
        // Every split point, including inside "data:" and inside the JSON.
        for piece in whole.as_bytes().chunks(7) {
            seen.extend(o.push(&Bytes::copy_from_slice(piece)));
        }
        assert_eq!(
            seen,
            vec![
                Observation::Tokens(1),
                Observation::Tokens(1),
                Observation::Usage(Usage {
                    prompt_tokens: 7,
                    completion_tokens: 2,
                    cached_tokens: Some(4)
                })
            ]
        );
    }

    #[test]
    fn unary_usage_and_stream_errors() {
        let mut o = Observer::new(Some("application/json"));
        let body = br#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#;
        assert!(o.push(&Bytes::from_static(&body[..10])).is_empty());
        assert!(o.push(&Bytes::from_static(&body[10..])).is_empty());
        assert_eq!(
            o.finish(),
            vec![
                Observation::Tokens(5),
                Observation::Usage(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 5,
                    cached_tokens: None
                })
            ]
        );
        let mut s = Observer::new(Some("text/event-stream"));
        let got = s.push(&Bytes::from_static(
            b"data: {\"error\":{\"message\":\"engine died\"}}\n\n",
        ));
        assert_eq!(got, vec![Observation::Error("engine died".into())]);
    }
}
