//! Frames of the TCP request plane: `[len u32 BE][kind u8][id u64 BE][payload]`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Kind byte + request id.
pub(crate) const HEADER: usize = 9;
/// Largest frame accepted by default (16 MiB).
pub const MAX_FRAME_DEFAULT: usize = 16 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request body.
    Request = 1,
    /// One response.
    Data = 2,
    /// The response stream ended.
    End = 3,
    /// The handler failed (payload: message).
    Error = 4,
    /// The caller went away.
    Cancel = 5,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Kind::Request,
            2 => Kind::Data,
            3 => Kind::End,
            4 => Kind::Error,
            5 => Kind::Cancel,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its kind.
    pub kind: Kind,
    /// The request it belongs to.
    pub id: u64,
    /// Body.
    pub payload: Bytes,
}

impl Frame {
    /// A frame.
    pub fn new(kind: Kind, id: u64, payload: Bytes) -> Self {
        Self { kind, id, payload }
    }
}

/// Why bytes are not a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading failed (or the peer closed mid-frame).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Over the size limit.
    #[error("frame of {0} bytes over the limit")]
    TooLarge(usize),
    /// Shorter than its header.
    #[error("frame of {0} bytes is shorter than its header")]
    TooShort(usize),
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
}

/// The request plane's codec for `tokio_util`'s `FramedRead` / `FramedWrite`:
/// a frame is checked against the size limit and its header as soon as its
/// length arrives, and decoded without copying its payload.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max: usize,
}

impl FrameCodec {
    /// A codec refusing frames over `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(len) = src.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(len.try_into().expect("four bytes")) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge(len));
        }
        if len < HEADER {
            return Err(FrameError::TooShort(len));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let kind_byte = src.get_u8();
        let kind = Kind::from_u8(kind_byte).ok_or(FrameError::UnknownKind(kind_byte))?;
        let id = src.get_u64();
        let payload = src.split_to(len - HEADER).freeze();
        Ok(Some(Frame { kind, id, payload }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, f: Frame, dst: &mut BytesMut) -> std::io::Result<()> {
        dst.reserve(4 + HEADER + f.payload.len());
        dst.put_u32((HEADER + f.payload.len()) as u32);
        dst.put_u8(f.kind as u8);
        dst.put_u64(f.id);
        dst.extend_from_slice(&f.payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures::{SinkExt, StreamExt};
    use tokio_util::codec::{FramedRead, FramedWrite};

    async fn read_all(bytes: &[u8], max: usize) -> Vec<Result<Frame, FrameError>> {
        FramedRead::new(bytes, FrameCodec::new(max)).collect().await
    }

    #[tokio::test]
    async fn round_trip_and_rejections() {
        let mut buf = Vec::new();
        let f = Frame::new(Kind::Data, 42, Bytes::from_static(b"hello"));
        let g = Frame::new(Kind::End, 43, Bytes::new());
        let mut wr = FramedWrite::new(&mut buf, FrameCodec::new(1024));
        wr.send(f.clone()).await.unwrap();
        wr.send(g.clone()).await.unwrap();
        let got: Vec<Frame> = read_all(&buf, 1024)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, vec![f, g], "both frames, then a clean end");
        // Split anywhere, the same frames come out.
        for cut in 1..buf.len() {
            let (a, b) = buf.split_at(cut);
            let chained = tokio::io::AsyncReadExt::chain(a, b);
            let n = FramedRead::new(chained, FrameCodec::new(1024))
                .count()
                .await;
            assert_eq!(n, 2, "cut at {cut}");
        }
        let first = |v: Vec<Result<Frame, FrameError>>| v.into_iter().next().unwrap();
        assert!(matches!(
            first(read_all(&[0u8, 0, 4, 0], 100).await),
            Err(FrameError::TooLarge(1024))
        ));
        assert!(matches!(
            first(read_all(&[0u8, 0, 0, 3, 1, 2, 3], 100).await),
            Err(FrameError::TooShort(3))
        ));
        assert!(matches!(
            first(read_all(&[0u8, 0, 0, 9, 77, 0, 0, 0, 0, 0, 0, 0, 1], 100).await),
            Err(FrameError::UnknownKind(77))
        ));
        assert!(matches!(
            first(read_all(&[0u8, 0, 0, 20, 2, 0], 100).await),
            Err(FrameError::Io(_))
        ));
    }
}
