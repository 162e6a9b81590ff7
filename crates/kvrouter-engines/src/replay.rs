//! The replay client: a DEALER asks an engine's ROUTER socket for every
//! buffered batch from a sequence number on.
//!
//! Request `[b"", start as 8-byte big-endian]`. Replies come one message per
//! batch, as `[b"", seq, payload]` (vLLM ≤ 0.25, SGLang ≤ 0.5.21) or
//! `[b"", topic, seq, payload]` (later versions, Dynamo's mocker); both are
//! read by taking the last two frames as (seq, payload). An empty payload
//! ends the replay. Publishers silently start from their oldest batch when
//! the one asked for is gone, and a slow reader can be cut short, so the
//! caller checks [`Replay::complete_from`] before trusting the history.

use std::time::Duration;

use bytes::Bytes;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// Most batches one replay accepts (engines buffer 10,000 by default).
pub const MAX_REPLAY: usize = 1_000_000;

/// Why a replay gave nothing usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The ROUTER could not be reached in time.
    #[error("replay endpoint {0} unreachable")]
    Unreachable(String),
    /// No reply, or no end marker, in time.
    #[error("replay timed out after {0} batches")]
    Timeout(usize),
    /// A reply that is not `[…, seq(8), payload]`.
    #[error("malformed replay reply: {0}")]
    Malformed(String),
}

/// The batches a replay returned, in the order received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// `(seq, payload)` per batch.
    pub batches: Vec<(u64, Bytes)>,
}

impl Replay {
    /// Whether the batches start at `start` and follow each other without a hole.
    pub fn complete_from(&self, start: u64) -> bool {
        self.batches.first().map(|(s, _)| *s) == Some(start)
            && self.batches.windows(2).all(|w| w[1].0 == w[0].0 + 1)
    }
}

/// One reply as the DEALER sees it: `Some((seq, payload))`, or `None` for
/// the end marker (an empty payload). The last two frames are (seq, payload)
/// in both layouts.
pub fn parse_reply(mut frames: Vec<Bytes>) -> Result<Option<(u64, Bytes)>, ReplayError> {
    if frames.len() < 3 {
        return Err(ReplayError::Malformed(format!(
            "{} frames, expected 3 or 4",
            frames.len()
        )));
    }
    let payload = frames.pop().expect("checked length");
    let seq = frames.pop().expect("checked length");
    if payload.is_empty() {
        return Ok(None);
    }
    let seq: [u8; 8] = seq[..]
        .try_into()
        .map_err(|_| ReplayError::Malformed(format!("a {}-byte sequence frame", seq.len())))?;
    Ok(Some((u64::from_be_bytes(seq), payload)))
}

/// Asks `endpoint` for every batch from `start`; each step (connect, each
/// reply) may take up to `timeout`.
pub async fn replay(endpoint: &str, start: u64, timeout: Duration) -> Result<Replay, ReplayError> {
    let mut socket = DealerSocket::new();
    match tokio::time::timeout(timeout, socket.connect(endpoint)).await {
        Ok(Ok(())) => {}
        _ => return Err(ReplayError::Unreachable(endpoint.to_string())),
    }
    let request = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&start.to_be_bytes()),
    ])
    .map_err(|e| ReplayError::Malformed(e.to_string()))?;
    if tokio::time::timeout(timeout, socket.send(request))
        .await
        .map_or(true, |r| r.is_err())
    {
        return Err(ReplayError::Unreachable(endpoint.to_string()));
    }
    let mut out = Replay::default();
    loop {
        let msg = match tokio::time::timeout(timeout, socket.recv()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(ReplayError::Malformed(e.to_string())),
            Err(_) => return Err(ReplayError::Timeout(out.batches.len())),
        };
        let Some((seq, payload)) = parse_reply(msg.into_vec())? else {
            return Ok(out);
        };
        out.batches.push((seq, payload));
        if out.batches.len() > MAX_REPLAY {
            return Err(ReplayError::Malformed(format!(
                "more than {MAX_REPLAY} batches"
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(seqs: &[u64]) -> Replay {
        Replay {
            batches: seqs
                .iter()
                .map(|s| (*s, Bytes::from_static(b"x")))
                .collect(),
        }
    }

    #[test]
    fn completeness() {
        assert!(r(&[5, 6, 7]).complete_from(5));
        assert!(!r(&[6, 7]).complete_from(5), "history gone");
        assert!(!r(&[5, 7]).complete_from(5), "cut short");
        assert!(!r(&[]).complete_from(5));
    }

    #[tokio::test]
    async fn unreachable_is_an_error_not_a_hang() {
        let e = replay("tcp://127.0.0.1:1", 0, Duration::from_millis(200)).await;
        assert!(matches!(e, Err(ReplayError::Unreachable(_))), "{e:?}");
    }
}
