//! The NATS request plane: requests on a subject, responses streamed to an inbox.
//!
//! A server subscribes to its instance subject. A request is a message with a
//! reply inbox; the server answers on that inbox with messages whose first byte
//! is the frame kind (accepted 6, data 2, end 3, error 4) followed by the
//! payload. "Accepted" goes first, so a caller that hears nothing within its
//! timeout knows no instance is there (`Unreachable`, retryable); NATS's own
//! "no responders" status says the same at once. A caller that
//! drops its stream publishes to `<inbox>.cancel`, which the server watches.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Handler, Kind, RequestError};

const ACCEPTED: u8 = 6;

fn tagged(kind: u8, payload: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(payload.len() + 1);
    v.push(kind);
    v.extend_from_slice(payload);
    v.into()
}

/// Serves `handler` on `subject` until `shutdown` fires.
pub async fn serve_nats(
    client: async_nats::Client,
    subject: String,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    serve_nats_then(client, subject, handler, shutdown, || {}).await
}

/// [`serve_nats`], calling `ready` once the subscription reached the server.
pub async fn serve_nats_then(
    client: async_nats::Client,
    subject: String,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
    ready: impl FnOnce(),
) -> Result<(), async_nats::SubscribeError> {
    let mut requests = client.subscribe(subject).await?;
    // The SUB must reach the server before callers can be answered.
    let _ = client.flush().await;
    ready();
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = requests.next() => match m { Some(m) => m, None => break },
        };
        let Some(inbox) = msg.reply.clone() else {
            tracing::warn!("request without a reply inbox; dropped");
            continue;
        };
        let client = client.clone();
        let handler = handler.clone();
        let token = shutdown.child_token();
        tokio::spawn(async move {
            let cancel_subject = format!("{inbox}.cancel");
            let Ok(mut cancel_sub) = client.subscribe(cancel_subject).await else {
                return;
            };
            let _ = client.flush().await;
            let _ = client.publish(inbox.clone(), tagged(ACCEPTED, b"")).await;
            let mut responses = handler.handle(msg.payload, token.clone());
            loop {
                let item = tokio::select! {
                    biased;
                    _ = cancel_sub.next() => { token.cancel(); return; }
                    _ = token.cancelled() => return,
                    item = responses.next() => item,
                };
                let (kind, body) = match item {
                    Some(Ok(data)) => (Kind::Data as u8, data),
                    Some(Err(e)) => (Kind::Error as u8, Bytes::from(e)),
                    None => (Kind::End as u8, Bytes::new()),
                };
                if client
                    .publish(inbox.clone(), tagged(kind, &body))
                    .await
                    .is_err()
                    || kind != Kind::Data as u8
                {
                    token.cancel();
                    return;
                }
            }
        });
    }
    Ok(())
}

/// A caller of one NATS subject.
#[derive(Clone)]
pub struct NatsRequester {
    client: async_nats::Client,
    subject: String,
    accept_timeout: Duration,
}

impl NatsRequester {
    /// Calls `subject`; an instance that does not accept within `accept_timeout` is unreachable.
    pub fn new(client: async_nats::Client, subject: String, accept_timeout: Duration) -> Self {
        Self {
            client,
            subject,
            accept_timeout,
        }
    }

    /// Sends a request; responses arrive on the returned stream.
    pub async fn request(&self, body: Bytes) -> Result<NatsResponseStream, RequestError> {
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|_| RequestError::ConnectionLost)?;
        self.client
            .publish_with_reply(self.subject.clone(), inbox.clone(), body)
            .await
            .map_err(|_| RequestError::ConnectionLost)?;
        let unreachable = || RequestError::Unreachable(self.subject.clone());
        let first = tokio::time::timeout(self.accept_timeout, sub.next())
            .await
            .map_err(|_| unreachable())?
            .ok_or_else(unreachable)?;
        if first.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            // The server told us at once that nobody listens on the subject.
            return Err(unreachable());
        }
        if first.payload.first() != Some(&ACCEPTED) {
            return Err(RequestError::Remote("protocol: expected an accept".into()));
        }
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let (kind, body) = match m.payload.split_first() {
                    Some((k, b)) => (*k, Bytes::copy_from_slice(b)),
                    None => continue,
                };
                let item = if kind == Kind::Data as u8 {
                    Ok(body)
                } else if kind == Kind::Error as u8 {
                    Err(RequestError::Remote(
                        String::from_utf8_lossy(&body).into_owned(),
                    ))
                } else {
                    break; // end
                };
                let last = item.is_err();
                if tx.send(item).await.is_err() || last {
                    break;
                }
            }
        });
        Ok(NatsResponseStream {
            rx,
            client: self.client.clone(),
            inbox,
            done: false,
        })
    }
}

/// Responses of one NATS request; dropping it early cancels the request.
pub struct NatsResponseStream {
    rx: mpsc::Receiver<Result<Bytes, RequestError>>,
    client: async_nats::Client,
    inbox: String,
    done: bool,
}

impl NatsResponseStream {
    /// The next response; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Result<Bytes, RequestError>> {
        let item = self.rx.recv().await;
        if item.is_none() || matches!(item, Some(Err(_))) {
            self.done = true;
        }
        item
    }
}

impl Drop for NatsResponseStream {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (client, subject) = (self.client.clone(), format!("{}.cancel", self.inbox));
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = client.publish(subject, Bytes::new()).await;
            });
        }
    }
}
