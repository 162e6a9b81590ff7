//! The request plane: one request in, a stream of responses out.
//!
//! Three transports: multiplexed TCP (below, the default), NATS subjects
//! ([`serve_nats`], [`NatsRequester`]) and HTTP ([`http_router`],
//! [`HttpRequester`]). TCP transport. One connection carries many requests; every frame is
//! `[len: u32 BE][kind: u8][request id: u64 BE][payload]`, `len` counting
//! everything after itself. Kinds: 1 request, 2 data, 3 end, 4 error (payload:
//! UTF-8 message), 5 cancel. A frame longer than the limit (default 16 MiB), of
//! an unknown kind or shorter than its header closes that connection (logged)
//! and cancels its requests; other connections are untouched. Back-pressure:
//! each connection writes through a bounded queue, so a slow reader slows its
//! handlers' streams. A caller that drops its response stream sends a cancel
//! frame; the handler sees its [`CancellationToken`] fire.

mod frame;
mod http;
mod nats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

pub use frame::{Frame, FrameCodec, FrameError, Kind, MAX_FRAME_DEFAULT};
pub use http::{HttpRequester, HttpResponseStream, http_router};
pub use nats::{NatsRequester, NatsResponseStream, serve_nats, serve_nats_then};

/// Serves requests: returns the response stream for one request.
pub trait Handler: Send + Sync + 'static {
    /// Handles `request`; `cancel` fires when the caller goes away.
    fn handle(
        &self,
        request: Bytes,
        cancel: CancellationToken,
    ) -> BoxStream<'static, Result<Bytes, String>>;
}

/// Why a request failed, and whether another instance may be tried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Nothing accepted the connection: nothing was sent, safe to retry elsewhere.
    #[error("instance unreachable at {0}")]
    Unreachable(String),
    /// The connection broke; retry only if no response arrived yet.
    #[error("connection lost")]
    ConnectionLost,
    /// The handler answered with an error.
    #[error("remote error: {0}")]
    Remote(String),
    /// The request does not fit in one frame.
    #[error("request of {0} bytes exceeds the frame limit")]
    TooLarge(usize),
}

impl RequestError {
    /// Whether the router may send the request to another instance.
    pub fn retryable(&self) -> bool {
        matches!(self, RequestError::Unreachable(_))
    }
}

/// The `tcp://host:port` to advertise in discovery for a listener bound to `bound`.
///
/// `host` (from configuration, e.g. `DYN_TCP_ADVERTISE_HOST`) wins; otherwise a
/// listener on a specific address advertises that address, and one on the
/// wildcard advertises loopback: right for one host, and never a guess (such as
/// the first interface) that silently breaks it.
pub fn advertise_address(bound: SocketAddr, host: Option<&str>) -> String {
    let host = match host {
        Some(h) if !h.is_empty() => h.to_string(),
        _ if bound.ip().is_unspecified() => "127.0.0.1".to_string(),
        _ => bound.ip().to_string(),
    };
    if host.contains(':') && !host.starts_with('[') {
        format!("tcp://[{host}]:{}", bound.port())
    } else {
        format!("tcp://{host}:{}", bound.port())
    }
}

#[cfg(test)]
mod tests {
    use super::advertise_address;

    #[test]
    fn advertised_addresses() {
        let any: std::net::SocketAddr = "0.0.0.0:4000".parse().unwrap();
        assert_eq!(advertise_address(any, None), "tcp://127.0.0.1:4000");
        assert_eq!(
            advertise_address(any, Some("10.1.2.3")),
            "tcp://10.1.2.3:4000"
        );
        let v6: std::net::SocketAddr = "[::1]:5".parse().unwrap();
        assert_eq!(advertise_address(v6, None), "tcp://[::1]:5");
        let specific: std::net::SocketAddr = "192.168.0.7:9".parse().unwrap();
        assert_eq!(advertise_address(specific, Some("")), "tcp://192.168.0.7:9");
    }
}

/// Frames queued per connection before writers wait.
const WRITE_QUEUE: usize = 1024;
/// Responses queued per request on the client before the connection's reader waits.
const STREAM_QUEUE: usize = 256;

/// Serves `handler` on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
    max_frame: usize,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(connection(stream, peer, handler.clone(), shutdown.child_token(), max_frame));
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<dyn Handler>,
    cancel: CancellationToken,
    max_frame: usize,
) {
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Frame>(WRITE_QUEUE);
    let writer = tokio::spawn(write_frames(wr, rx));
    let mut frames = FramedRead::new(rd, FrameCodec::new(max_frame));
    let mut active: HashMap<u64, CancellationToken> = HashMap::new();
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => break,
            f = frames.next() => f,
        };
        match frame {
            None => break,
            Some(Ok(f)) => match f.kind {
                Kind::Request => {
                    let token = cancel.child_token();
                    active.retain(|_, t| !t.is_cancelled());
                    active.insert(f.id, token.clone());
                    let mut responses = handler.handle(f.payload, token.clone());
                    let tx = tx.clone();
                    let id = f.id;
                    tokio::spawn(async move {
                        loop {
                            let item = tokio::select! {
                                biased;
                                _ = token.cancelled() => return,
                                item = responses.next() => item,
                            };
                            if item.is_none() && token.is_cancelled() {
                                // Ended because it was cancelled: not a completed stream.
                                return;
                            }
                            let frame = match item {
                                Some(Ok(data)) => Frame::new(Kind::Data, id, data),
                                Some(Err(msg)) => Frame::new(Kind::Error, id, Bytes::from(msg)),
                                None => Frame::new(Kind::End, id, Bytes::new()),
                            };
                            let last = frame.kind != Kind::Data;
                            if tx.send(frame).await.is_err() || last {
                                token.cancel();
                                return;
                            }
                        }
                    });
                }
                Kind::Cancel => {
                    if let Some(t) = active.remove(&f.id) {
                        t.cancel();
                    }
                }
                other => {
                    tracing::warn!(%peer, kind = ?other, "unexpected frame from a client; closing");
                    break;
                }
            },
            Some(Err(e)) => {
                tracing::warn!(%peer, error = %e, "bad frame; closing the connection");
                break;
            }
        }
    }
    for t in active.values() {
        t.cancel();
    }
    drop(tx);
    let _ = writer.await;
}

async fn write_frames(wr: tokio::net::tcp::OwnedWriteHalf, mut rx: mpsc::Receiver<Frame>) {
    // The writer only encodes what this process built: no limit to check.
    let mut wr = FramedWrite::new(wr, FrameCodec::new(usize::MAX));
    while let Some(f) = rx.recv().await {
        if wr.feed(f).await.is_err() {
            return;
        }
        // Batch whatever is already queued into one flush.
        while let Ok(f) = rx.try_recv() {
            if wr.feed(f).await.is_err() {
                return;
            }
        }
        if wr.flush().await.is_err() {
            return;
        }
    }
}

/// The requests awaiting responses on one connection. `closed` is set, under
/// the same lock, when the connection's reader ends: a request registered after
/// that would wait for a response that cannot come, so it is refused instead.
#[derive(Default)]
struct PendingMap {
    open: HashMap<u64, mpsc::Sender<Result<Bytes, RequestError>>>,
    closed: bool,
}

type Pending = Arc<Mutex<PendingMap>>;

/// A client connection to one instance; cheap to clone, multiplexes requests.
#[derive(Clone)]
pub struct TcpClient {
    tx: mpsc::Sender<Frame>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    max_frame: usize,
}

impl TcpClient {
    /// Connects, failing fast (typed, retryable) when nothing listens.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Self, RequestError> {
        let unreachable = || RequestError::Unreachable(addr.to_string());
        let target = addr.strip_prefix("tcp://").unwrap_or(addr);
        let stream = tokio::time::timeout(timeout, TcpStream::connect(target))
            .await
            .map_err(|_| unreachable())?
            .map_err(|_| unreachable())?;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::channel::<Frame>(WRITE_QUEUE);
        tokio::spawn(write_frames(wr, rx));
        let pending: Pending = Arc::default();
        tokio::spawn(read_responses(rd, pending.clone(), MAX_FRAME_DEFAULT));
        Ok(Self {
            tx,
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
            max_frame: MAX_FRAME_DEFAULT,
        })
    }

    /// Sends a request; its responses arrive on the returned stream.
    pub async fn request(&self, body: Bytes) -> Result<ResponseStream, RequestError> {
        if body.len() + frame::HEADER > self.max_frame {
            return Err(RequestError::TooLarge(body.len()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        {
            let mut p = self.pending.lock().expect("pending lock");
            if p.closed {
                return Err(RequestError::ConnectionLost);
            }
            p.open.insert(id, tx);
        }
        if self
            .tx
            .send(Frame::new(Kind::Request, id, body))
            .await
            .is_err()
        {
            self.pending.lock().expect("pending lock").open.remove(&id);
            return Err(RequestError::ConnectionLost);
        }
        Ok(ResponseStream {
            id,
            rx,
            tx: self.tx.clone(),
            pending: self.pending.clone(),
            done: false,
        })
    }
}

async fn read_responses<R: AsyncRead + Unpin>(rd: R, pending: Pending, max_frame: usize) {
    let mut frames = FramedRead::new(rd, FrameCodec::new(max_frame));
    while let Some(Ok(f)) = frames.next().await {
        let tx = pending
            .lock()
            .expect("pending lock")
            .open
            .get(&f.id)
            .cloned();
        let Some(tx) = tx else { continue }; // cancelled by the caller
        let item = match f.kind {
            Kind::Data => Ok(f.payload),
            Kind::Error => Err(RequestError::Remote(
                String::from_utf8_lossy(&f.payload).into_owned(),
            )),
            Kind::End => {
                pending.lock().expect("pending lock").open.remove(&f.id);
                continue; // dropping the sender ends the stream
            }
            _ => continue,
        };
        let last = item.is_err();
        if last {
            pending.lock().expect("pending lock").open.remove(&f.id);
        }
        let _ = tx.send(item).await;
    }
    // The connection is gone: every open stream ends with an error.
    let open: Vec<_> = {
        let mut p = pending.lock().expect("pending lock");
        p.closed = true;
        p.open.drain().collect()
    };
    for (_, tx) in open {
        let _ = tx.send(Err(RequestError::ConnectionLost)).await;
    }
}

/// Responses of one request; dropping it early cancels the request.
pub struct ResponseStream {
    id: u64,
    rx: mpsc::Receiver<Result<Bytes, RequestError>>,
    tx: mpsc::Sender<Frame>,
    pending: Pending,
    done: bool,
}

impl ResponseStream {
    /// The next response; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Result<Bytes, RequestError>> {
        let item = self.rx.recv().await;
        if item.is_none() || matches!(item, Some(Err(_))) {
            self.done = true;
        }
        item
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self
            .pending
            .lock()
            .expect("pending lock")
            .open
            .remove(&self.id)
            .is_some()
        {
            // Best effort: if the queue is full or closed the connection is in trouble anyway.
            let _ = self
                .tx
                .try_send(Frame::new(Kind::Cancel, self.id, Bytes::new()));
        }
    }
}

/// Writes raw bytes to a server (tests of malformed input).
#[doc(hidden)]
pub async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    Ok(s)
}
