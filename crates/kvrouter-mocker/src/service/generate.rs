//! The worker's `generate` handler: a tokenized request becomes a command
//! to its rank's engine loop, and the tokens the loop sends back become
//! `LlmEngineOutput`s — sampled text, EOS, `max_tokens`, usage with the
//! cached prompt tokens, and the prefill answer of a disaggregated worker.
//! Dropping the stream aborts the request in the engine.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use kvrouter_core::error::UpstreamError;
use kvrouter_core::hash::{block_hashes, sequence_hashes};
use kvrouter_core::llm::{
    CompletionUsage, FinishReason, LlmEngineOutput, PreprocessedRequest, PromptTokensDetails,
};
use kvrouter_runtime::request::Handler;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Command, DEFAULT_MAX_TOKENS, Ranks, Role};
use crate::blocks::FullBlock;
use crate::engine::{EngineRequest, TokenOutput};
use crate::vllm::BookGuard;

/// Counts a generation in flight while it lives.
pub(super) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn prompt_blocks_of(
    local: &[kvrouter_core::LocalBlockHash],
    seq: &[kvrouter_core::SequenceHash],
) -> Vec<FullBlock> {
    local
        .iter()
        .zip(seq)
        .map(|(l, s)| FullBlock {
            seq: s.0,
            local: l.0,
        })
        .collect()
}

/// Aborts the engine request when the response stream is dropped early.
struct AbortOnDrop {
    tx: mpsc::UnboundedSender<Command>,
    id: u64,
    finished: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.tx.send(Command::Abort(self.id));
        }
    }
}

struct Generation {
    rx: mpsc::UnboundedReceiver<TokenOutput>,
    guard: AbortOnDrop,
    rng: StdRng,
    vocab: std::ops::Range<u32>,
    eos_probability: f64,
    min_tokens: u32,
    ignore_eos: bool,
    eos_token: Option<u32>,
    /// Scripted answer tokens (a testing aid), replacing the sampled ones.
    script: Option<Arc<Vec<u32>>>,
    prompt_tokens: u32,
    max_tokens: u32,
    cancel: CancellationToken,
    /// On a prefill worker: the transfer parameters to answer with.
    prefill_of: Option<serde_json::Value>,
    /// Keeps the prompt's tokens known until the request ends (vLLM events).
    _book: Option<BookGuard>,
    _in_flight: InFlight,
}

impl Handler for Ranks {
    fn handle(
        &self,
        request: Bytes,
        cancel: CancellationToken,
    ) -> BoxStream<'static, Result<Bytes, String>> {
        let req: PreprocessedRequest = match serde_json::from_slice(&request) {
            Ok(r) => r,
            Err(e) => {
                let msg = UpstreamError::invalid(format!("invalid request: {e}")).to_wire();
                return futures::stream::once(async move { Err(msg) }).boxed();
            }
        };
        let prompt = req.token_ids.len() as u32;
        if prompt == 0 {
            let msg = UpstreamError::invalid("invalid request: empty prompt").to_wire();
            return futures::stream::once(async move { Err(msg) }).boxed();
        }
        if prompt >= self.cfg.context_length {
            let msg = UpstreamError::invalid(format!(
                "invalid request: the prompt has {prompt} tokens; the context is {}",
                self.cfg.context_length
            ))
            .to_wire();
            return futures::stream::once(async move { Err(msg) }).boxed();
        }
        let rank = req.dp_rank().unwrap_or(0) as usize % self.tx.len();
        let bs = self.cfg.engine.block_size;
        let local = block_hashes(&req.token_ids, bs);
        let seq = sequence_hashes(&local);
        let prompt_blocks = prompt_blocks_of(&local, &seq);
        let room = self.cfg.context_length - prompt;
        let max_tokens = match self.cfg.role {
            // A prefill worker's answer is the first token; decode continues elsewhere.
            Role::Prefill => 1,
            _ => req
                .stop_conditions
                .max_tokens
                .unwrap_or(DEFAULT_MAX_TOKENS)
                .clamp(1, room.max(1)),
        };
        if self.cfg.role != Role::Prefill && req.prefill_result.is_some() {
            let blocks: Vec<FullBlock> = prompt_blocks_of(&local, &seq);
            let _ = self.tx[rank].send(Command::Import(blocks));
        }
        let book = self.books.get(rank).map(|b| {
            b.acquire(
                local
                    .iter()
                    .zip(req.token_ids.chunks_exact(bs))
                    .map(|(l, t)| (l.0, t))
                    .collect(),
            )
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let engine_req = EngineRequest {
            id,
            prompt_tokens: req.token_ids.len(),
            prompt_blocks,
            max_tokens: max_tokens as usize,
        };
        if self.tx[rank].send(Command::Add(engine_req, tx)).is_err() {
            let msg = UpstreamError::unreachable("worker is shutting down").to_wire();
            return futures::stream::once(async move { Err(msg) }).boxed();
        }
        // Unseeded requests differ across requests and workers.
        let seed = req
            .sampling_options
            .seed
            .unwrap_or(id ^ self.worker_id.rotate_left(17));
        let generation = Generation {
            rx,
            guard: AbortOnDrop {
                tx: self.tx[rank].clone(),
                id,
                finished: false,
            },
            rng: StdRng::seed_from_u64(seed),
            vocab: self.cfg.vocab.clone(),
            eos_probability: self.cfg.eos_probability,
            min_tokens: req.stop_conditions.min_tokens.unwrap_or(0),
            ignore_eos: req.stop_conditions.ignore_eos.unwrap_or(false),
            eos_token: req.eos_token_ids.first().copied(),
            script: self.cfg.script.clone(),
            prompt_tokens: prompt,
            max_tokens,
            cancel,
            prefill_of: (self.cfg.role == Role::Prefill).then(|| {
                serde_json::json!({
                    "prefill_worker_id": self.worker_id,
                    "dp_rank": rank,
                    "kv_blocks": local.len(),
                })
            }),
            _book: book,
            _in_flight: InFlight::new(&self.active),
        };
        futures::stream::unfold(Some(generation), |state| async move {
            let mut g = state?;
            let t = tokio::select! {
                _ = g.cancel.cancelled() => return None,
                t = g.rx.recv() => t,
            };
            let Some(t) = t else {
                let e = UpstreamError::mid_stream("the engine dropped the request");
                return Some((Err(e.to_wire()), None));
            };
            let generated = t.generated as u32;
            // A scripted answer ends with its last token, as a stop.
            let scripted = g.script.as_ref().map(|s| {
                let i = (generated as usize).saturating_sub(1);
                (s.get(i).copied(), i + 1 >= s.len())
            });
            let eos = scripted.is_some_and(|(_, last)| last)
                || scripted.is_none()
                    && !g.ignore_eos
                // Never the first token: an answer is never empty.
                && generated > g.min_tokens.max(1)
                && g.rng.random::<f64>() < g.eos_probability;
            let finish = if eos {
                Some(FinishReason::Eos)
            } else if t.finished || generated >= g.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            let token = match (scripted, eos, g.eos_token) {
                (Some((Some(t), _)), _, _) => t,
                (None, true, Some(e)) => e,
                _ => g.rng.random_range(g.vocab.clone()),
            };
            let mut out = LlmEngineOutput {
                token_ids: vec![token],
                finish_reason: finish,
                ..Default::default()
            };
            if finish.is_some() {
                if g.prefill_of.is_some() {
                    out.disaggregated_params = g.prefill_of.take();
                }
                out.completion_usage = Some(CompletionUsage {
                    prompt_tokens: g.prompt_tokens,
                    completion_tokens: generated,
                    total_tokens: g.prompt_tokens + generated,
                    prompt_tokens_details: Some(PromptTokensDetails {
                        cached_tokens: t.cached_tokens as u32,
                    }),
                });
                // An EOS before max_tokens must stop the engine; a finished one already stopped.
                g.guard.finished = t.finished;
                drop(g);
                let bytes = serde_json::to_vec(&out).expect("outputs serialize");
                return Some((Ok(Bytes::from(bytes)), None));
            }
            let bytes = serde_json::to_vec(&out).expect("outputs serialize");
            Some((Ok(Bytes::from(bytes)), Some(g)))
        })
        .boxed()
    }
}
