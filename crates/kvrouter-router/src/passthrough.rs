//! An engine's answer on its way to the client, unchanged, with the router's
//! model of the request following it: prefill done at the first generated
//! chunk, output blocks as chunks arrive, freed at the end, on an error, or
//! when the client goes away (dropping the stream drops the engine
//! connection, which cancels the engine's request).
//!
//! When the engine fails mid-stream, a server-sent-events answer ends with an
//! OpenAI error event and `data: [DONE]` — the client sees why, never a cut
//! stream; a unary answer ends with a body error (the connection is reset).
//! Either way the engine leaves routing until its health probe passes.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use kvrouter_engines::observe::{Observation, Observer};
use kvrouter_engines::upstream::UpstreamResponse;

use crate::engines::Engine;
use crate::router::ActiveRequest;

/// Hears what the observer saw (the frontend's per-request metrics).
pub type ObservationHook = Box<dyn FnMut(&Observation) + Send>;

/// A routed engine answer (see the module docs).
pub struct Passthrough {
    /// The engine's status.
    pub status: u16,
    /// The engine's content type.
    pub content_type: Option<String>,
    /// The engine serving it.
    pub worker_id: u64,
    /// The rank serving it.
    pub dp_rank: u32,
    /// Prompt blocks the router expected cached there.
    pub overlap_blocks: u32,
    state: State,
}

struct State {
    body: BoxStream<'static, Result<Bytes, kvrouter_engines::UpstreamError>>,
    observer: Observer,
    active: ActiveRequest,
    engine: Arc<Engine>,
    sse: bool,
    done: bool,
    hook: Option<ObservationHook>,
}

impl State {
    fn observe(&mut self, seen: Vec<Observation>) {
        for o in &seen {
            match o {
                Observation::Tokens(n) => self.active.on_tokens(*n),
                Observation::Error(m) => {
                    tracing::warn!(engine = self.engine.id, error = %m, "the engine reported an error in its stream")
                }
                Observation::Usage(_) => {}
            }
            if let Some(h) = self.hook.as_mut() {
                h(o);
            }
        }
    }
}

/// The error event that ends a stream whose engine failed.
fn error_event(message: &str) -> Bytes {
    let body = serde_json::json!({"error": {
        "message": message, "type": "upstream_error", "param": null, "code": "engine_failed",
    }});
    Bytes::from(format!("data: {body}\n\ndata: [DONE]\n\n"))
}

impl Passthrough {
    pub(crate) fn new(
        resp: UpstreamResponse,
        active: ActiveRequest,
        engine: Arc<Engine>,
        overlap_blocks: u32,
    ) -> Self {
        let sse = resp
            .content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("text/event-stream"));
        let worker = active.worker();
        Self {
            status: resp.status,
            content_type: resp.content_type.clone(),
            worker_id: worker.worker_id,
            dp_rank: worker.dp_rank,
            overlap_blocks,
            state: State {
                observer: Observer::new(resp.content_type.as_deref()),
                body: resp.body,
                active,
                engine,
                sse,
                done: false,
                hook: None,
            },
        }
    }

    /// Calls `hook` with everything observed in the answer.
    pub fn on_observation(&mut self, hook: ObservationHook) {
        self.state.hook = Some(hook);
    }

    /// The body, as the client gets it.
    pub fn into_body(self) -> BoxStream<'static, Result<Bytes, std::io::Error>> {
        futures::stream::unfold(self.state, |mut st| async move {
            if st.done {
                return None;
            }
            match st.body.next().await {
                Some(Ok(chunk)) => {
                    let seen = st.observer.push(&chunk);
                    st.observe(seen);
                    Some((Ok(chunk), st))
                }
                Some(Err(e)) => {
                    st.done = true;
                    st.engine.mark_down(&e.message);
                    tracing::warn!(engine = st.engine.id, error = %e, "engine failed mid-stream");
                    if st.sse {
                        Some((Ok(error_event(&e.message)), st))
                    } else {
                        Some((Err(std::io::Error::other(e.message.clone())), st))
                    }
                }
                None => {
                    st.done = true;
                    let seen = st.observer.finish();
                    st.observe(seen);
                    st.engine.completed();
                    None
                }
            }
        })
        .boxed()
    }
}
