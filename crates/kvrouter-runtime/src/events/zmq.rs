//! ZeroMQ event plane: a publisher binds a PUB socket, subscribers connect.
//!
//! Messages are three frames, `[topic, seq: u64 BE, payload]`, the framing
//! vLLM and SGLang use for their KV events, so the same subscriber reads
//! engines and kvrouter workers. PUB drops messages for a subscriber that falls
//! too far behind; the sequence number makes such gaps visible
//! ([`ZmqMessage::gap`]), and the layer above recovers (replay or resync).
//! Publishers advertise their bound address through discovery.

use bytes::Bytes;
use zeromq::{PubSocket, Socket, SocketRecv, SocketSend, SubSocket};

use super::EventError;

fn err(e: impl std::fmt::Display) -> EventError {
    EventError::Zmq(e.to_string())
}

/// A bound PUB socket numbering its messages.
pub struct ZmqPublisher {
    socket: PubSocket,
    address: String,
    seq: u64,
}

impl ZmqPublisher {
    /// Binds `addr` (`tcp://127.0.0.1:0` picks a free port; see [`Self::address`]).
    pub async fn bind(addr: &str) -> Result<Self, EventError> {
        let mut socket = PubSocket::new();
        let endpoint = socket.bind(addr).await.map_err(err)?;
        Ok(Self {
            socket,
            address: endpoint.to_string(),
            seq: 0,
        })
    }

    /// The bound address, to advertise.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Publishes one message on `topic`; returns its sequence number.
    pub async fn publish(&mut self, topic: &str, payload: Bytes) -> Result<u64, EventError> {
        let seq = self.seq;
        self.seq += 1;
        let frames = vec![
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload,
        ];
        let msg = zeromq::ZmqMessage::try_from(frames).map_err(err)?;
        self.socket.send(msg).await.map_err(err)?;
        Ok(seq)
    }
}

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZmqMessage {
    /// Topic frame.
    pub topic: Bytes,
    /// Publisher's sequence number.
    pub seq: u64,
    /// Payload frame.
    pub payload: Bytes,
    /// Messages missing before this one (sequence gap since the previous), if any.
    pub gap: u64,
}

/// A SUB socket connected to one or more publishers.
pub struct ZmqSubscriber {
    socket: SubSocket,
    last: Option<u64>,
}

impl ZmqSubscriber {
    /// Connects to `addr` and subscribes to topics starting with `prefix` ("" = all).
    pub async fn connect(addr: &str, prefix: &str) -> Result<Self, EventError> {
        let mut socket = SubSocket::new();
        socket.connect(addr).await.map_err(err)?;
        socket.subscribe(prefix).await.map_err(err)?;
        Ok(Self { socket, last: None })
    }

    /// The next message. Malformed messages (not three frames, a short
    /// sequence frame) are an error the caller counts and skips.
    pub async fn next(&mut self) -> Result<ZmqMessage, EventError> {
        let msg = self.socket.recv().await.map_err(err)?;
        let frames = msg.into_vec();
        if frames.len() != 3 || frames[1].len() != 8 {
            return Err(EventError::Malformed(format!(
                "expected [topic, seq(8 bytes), payload], got {} frames",
                frames.len()
            )));
        }
        let seq = u64::from_be_bytes(frames[1][..].try_into().expect("checked length"));
        let gap = match self.last {
            Some(prev) if seq > prev + 1 => seq - prev - 1,
            _ => 0,
        };
        self.last = Some(seq);
        let mut it = frames.into_iter();
        let topic = it.next().expect("three frames");
        let payload = it.nth(1).expect("three frames");
        Ok(ZmqMessage {
            topic,
            seq,
            payload,
            gap,
        })
    }
}
