//! Frames of the TCP request plane: `[len u32 BE][kind u8][id u64 BE][payload]`.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// Reads one frame; `Ok(None)` on a clean end of stream.
pub(crate) async fn read<R: AsyncRead + Unpin>(
    rd: &mut R,
    max: usize,
) -> Result<Option<Frame>, FrameError> {
    let len = match rd.read_u32().await {
        Ok(n) => n as usize,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if len > max {
        return Err(FrameError::TooLarge(len));
    }
    if len < HEADER {
        return Err(FrameError::TooShort(len));
    }
    let kind_byte = rd.read_u8().await?;
    let kind = Kind::from_u8(kind_byte).ok_or(FrameError::UnknownKind(kind_byte))?;
    let id = rd.read_u64().await?;
    let mut payload = vec![0u8; len - HEADER];
    rd.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind,
        id,
        payload: payload.into(),
    }))
}

/// Writes one frame (unflushed).
pub(crate) async fn write<W: AsyncWrite + Unpin>(wr: &mut W, f: &Frame) -> std::io::Result<()> {
    wr.write_u32((HEADER + f.payload.len()) as u32).await?;
    wr.write_u8(f.kind as u8).await?;
    wr.write_u64(f.id).await?;
    wr.write_all(&f.payload).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_rejections() {
        let mut buf = Vec::new();
        let f = Frame::new(Kind::Data, 42, Bytes::from_static(b"hello"));
        write(&mut buf, &f).await.unwrap();
        let mut rd = &buf[..];
        assert_eq!(read(&mut rd, 1024).await.unwrap(), Some(f));
        assert!(read(&mut rd, 1024).await.unwrap().is_none());
        let mut big = &[0u8, 0, 4, 0][..];
        assert!(matches!(
            read(&mut big, 100).await,
            Err(FrameError::TooLarge(1024))
        ));
        let mut short = &[0u8, 0, 0, 3, 1, 2, 3][..];
        assert!(matches!(
            read(&mut short, 100).await,
            Err(FrameError::TooShort(3))
        ));
        let mut odd = &[0u8, 0, 0, 9, 77, 0, 0, 0, 0, 0, 0, 0, 1][..];
        assert!(matches!(
            read(&mut odd, 100).await,
            Err(FrameError::UnknownKind(77))
        ));
        let mut cut = &[0u8, 0, 0, 20, 2, 0][..];
        assert!(matches!(read(&mut cut, 100).await, Err(FrameError::Io(_))));
    }
}
