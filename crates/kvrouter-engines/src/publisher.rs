//! Publishing KV events the way vLLM does, for engines kvrouter simulates
//! (`kvrouter mocker --zmq-kv-events-port`): a PUB socket sends
//! `[topic, seq(8, BE), msgpack batch]`, every batch is kept in a bounded
//! buffer, and a ROUTER socket replays it on request.
//!
//! [`EventFormat::Map`] writes events as vLLM ≥ 0.26 does (maps with
//! `"type"`, 4-frame replay replies with the topic); [`EventFormat::Array`]
//! as vLLM ≤ 0.23 did (tag-first arrays of 10 slots, 3-frame replies).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use rmpv::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::wire::EngineEvent;

/// How events are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventFormat {
    /// `{"type": "BlockStored", …}` (vLLM ≥ 0.24, SGLang ≥ 0.5.20).
    #[default]
    Map,
    /// `["BlockStored", …]` (vLLM ≤ 0.23, SGLang ≤ 0.5.19).
    Array,
}

impl std::str::FromStr for EventFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "map" => Ok(Self::Map),
            "array" => Ok(Self::Array),
            other => Err(format!("{other:?} is not an event format (map, array)")),
        }
    }
}

/// Batches kept for replay (vLLM's `buffer_steps` default).
pub const BUFFER_STEPS: usize = 10_000;

fn s(x: &str) -> Value {
    Value::from(x)
}

fn hashes(h: &[u64]) -> Value {
    Value::Array(h.iter().map(|&x| Value::from(x)).collect())
}

fn opt_str(x: &Option<String>) -> Value {
    x.as_deref().map_or(Value::Nil, s)
}

/// One event, in `format`.
pub fn encode_event(ev: &EngineEvent, format: EventFormat) -> Value {
    match (ev, format) {
        (EngineEvent::Stored(b), EventFormat::Map) => Value::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), hashes(&b.block_hashes)),
            (
                s("parent_block_hash"),
                b.parent_block_hash.map_or(Value::Nil, Value::from),
            ),
            (
                s("token_ids"),
                Value::Array(b.token_ids.iter().map(|&t| Value::from(t)).collect()),
            ),
            (s("block_size"), Value::from(b.block_size)),
            (s("lora_id"), Value::Nil),
            (s("medium"), b.medium.as_deref().map_or(s("GPU"), s)),
            (s("lora_name"), opt_str(&b.lora_name)),
            (s("group_idx"), Value::from(b.group_idx.unwrap_or(0))),
        ]),
        (EngineEvent::Stored(b), EventFormat::Array) => Value::Array(vec![
            s("BlockStored"),
            hashes(&b.block_hashes),
            b.parent_block_hash.map_or(Value::Nil, Value::from),
            Value::Array(b.token_ids.iter().map(|&t| Value::from(t)).collect()),
            Value::from(b.block_size),
            Value::Nil,
            b.medium.as_deref().map_or(s("GPU"), s),
            opt_str(&b.lora_name),
            Value::Nil,
            Value::from(b.group_idx.unwrap_or(0)),
        ]),
        (EngineEvent::Removed(r), EventFormat::Map) => Value::Map(vec![
            (s("type"), s("BlockRemoved")),
            (s("block_hashes"), hashes(&r.block_hashes)),
            (s("medium"), r.medium.as_deref().map_or(s("GPU"), s)),
            (s("group_idx"), Value::from(r.group_idx.unwrap_or(0))),
        ]),
        (EngineEvent::Removed(r), EventFormat::Array) => Value::Array(vec![
            s("BlockRemoved"),
            hashes(&r.block_hashes),
            r.medium.as_deref().map_or(s("GPU"), s),
            Value::from(r.group_idx.unwrap_or(0)),
        ]),
        (EngineEvent::AllCleared, EventFormat::Map) => {
            Value::Map(vec![(s("type"), s("AllBlocksCleared"))])
        }
        (EngineEvent::AllCleared, EventFormat::Array) => Value::Array(vec![s("AllBlocksCleared")]),
    }
}

/// A batch `[ts, events, dp_rank]`, as msgpack bytes.
pub fn encode_batch(ts: f64, events: &[EngineEvent], dp_rank: u32, format: EventFormat) -> Bytes {
    let v = Value::Array(vec![
        Value::F64(ts),
        Value::Array(events.iter().map(|e| encode_event(e, format)).collect()),
        Value::from(dp_rank),
    ]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &v).expect("writing to a Vec cannot fail");
    Bytes::from(out)
}

type Buffer = Arc<Mutex<VecDeque<(u64, Bytes)>>>;

/// A vLLM-style publisher of one rank (see the module docs).
pub struct ZmqKvPublisher {
    socket: PubSocket,
    address: String,
    replay_address: Option<String>,
    topic: Bytes,
    seq: u64,
    dp_rank: u32,
    format: EventFormat,
    buffer: Buffer,
    buffer_steps: usize,
    replay_task: Option<JoinHandle<()>>,
    cancel: CancellationToken,
}

impl ZmqKvPublisher {
    /// Binds the PUB on `endpoint` and, when given, the replay ROUTER.
    pub async fn bind(
        endpoint: &str,
        replay_endpoint: Option<&str>,
        dp_rank: u32,
        format: EventFormat,
    ) -> Result<Self, zeromq::ZmqError> {
        let mut socket = PubSocket::new();
        let address = socket.bind(endpoint).await?.to_string();
        let buffer: Buffer = Arc::new(Mutex::new(VecDeque::new()));
        let cancel = CancellationToken::new();
        let topic = Bytes::new();
        let (replay_address, replay_task) = match replay_endpoint {
            Some(r) => {
                let mut router = RouterSocket::new();
                let addr = router.bind(r).await?.to_string();
                let task = tokio::spawn(serve_replays(
                    router,
                    buffer.clone(),
                    topic.clone(),
                    format,
                    cancel.clone(),
                ));
                (Some(addr), Some(task))
            }
            None => (None, None),
        };
        Ok(Self {
            socket,
            address,
            replay_address,
            topic,
            seq: 0,
            dp_rank,
            format,
            buffer,
            buffer_steps: BUFFER_STEPS,
            replay_task,
            cancel,
        })
    }

    /// The PUB's bound address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The replay ROUTER's bound address.
    pub fn replay_address(&self) -> Option<&str> {
        self.replay_address.as_deref()
    }

    /// Keeps at most `n` batches for replay (default [`BUFFER_STEPS`]).
    pub fn set_buffer_steps(&mut self, n: usize) {
        self.buffer_steps = n.max(1);
    }

    /// Publishes one batch (nothing for an empty one, as engines do).
    pub async fn publish(&mut self, events: &[EngineEvent]) -> Result<(), zeromq::ZmqError> {
        match self.number(events) {
            Some((seq, payload)) => self.send(seq, payload).await,
            None => Ok(()),
        }
    }

    /// Numbers and buffers a batch without sending it: what a PUB does when
    /// a subscriber's queue is full (fault tests use it to make gaps).
    pub fn publish_lost(&mut self, events: &[EngineEvent]) {
        let _ = self.number(events);
    }

    fn number(&mut self, events: &[EngineEvent]) -> Option<(u64, Bytes)> {
        if events.is_empty() {
            return None;
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let payload = encode_batch(ts, events, self.dp_rank, self.format);
        let seq = self.seq;
        self.seq += 1;
        // Buffered before it is sent, so a replay never misses a sent batch.
        let mut b = self.buffer.lock();
        b.push_back((seq, payload.clone()));
        while b.len() > self.buffer_steps {
            b.pop_front();
        }
        Some((seq, payload))
    }

    async fn send(&mut self, seq: u64, payload: Bytes) -> Result<(), zeromq::ZmqError> {
        let msg = ZmqMessage::try_from(vec![
            self.topic.clone(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload,
        ])
        .expect("three frames");
        self.socket.send(msg).await
    }
}

impl Drop for ZmqKvPublisher {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.replay_task.take() {
            t.abort();
        }
    }
}

async fn serve_replays(
    mut router: RouterSocket,
    buffer: Buffer,
    topic: Bytes,
    format: EventFormat,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return,
            m = router.recv() => match m { Ok(m) => m, Err(_) => return },
        };
        let frames = msg.into_vec();
        // Exactly [identity, empty, start(8)], as vLLM's ROUTER insists.
        if frames.len() != 3 || !frames[1].is_empty() || frames[2].len() != 8 {
            tracing::warn!(frames = frames.len(), "malformed replay request ignored");
            continue;
        }
        let identity = frames[0].clone();
        let start = u64::from_be_bytes(frames[2][..].try_into().expect("checked length"));
        let batches: Vec<(u64, Bytes)> = buffer
            .lock()
            .iter()
            .filter(|(s, _)| *s >= start)
            .cloned()
            .collect();
        let reply = |seq: Bytes, payload: Bytes| {
            let mut f = vec![identity.clone(), Bytes::new()];
            if format == EventFormat::Map {
                f.push(topic.clone());
            }
            f.push(seq);
            f.push(payload);
            ZmqMessage::try_from(f).expect("frames")
        };
        for (seq, payload) in batches {
            if router
                .send(reply(Bytes::copy_from_slice(&seq.to_be_bytes()), payload))
                .await
                .is_err()
            {
                break;
            }
        }
        let end = reply(Bytes::from_static(&[0xFF; 8]), Bytes::new());
        let _ = router.send(end).await;
    }
}
