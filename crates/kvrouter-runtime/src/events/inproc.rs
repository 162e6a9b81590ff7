//! In-process event plane: one bounded channel per subscriber.
//!
//! A slow subscriber slows its publishers (back-pressure) instead of losing
//! events, which is the right trade inside one process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream_shim::ReceiverStream;

use super::{EventError, EventPlane, Subscription};

/// Messages a subscriber may have queued before publishers wait.
const SUBSCRIBER_QUEUE: usize = 65_536;

/// Publish/subscribe inside one process.
#[derive(Clone, Default)]
pub struct InProcEvents {
    subs: Arc<Mutex<HashMap<String, Vec<mpsc::Sender<Bytes>>>>>,
}

impl InProcEvents {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl EventPlane for InProcEvents {
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), EventError> {
        let senders: Vec<mpsc::Sender<Bytes>> = {
            let subs = self.subs.lock().expect("event bus lock");
            subs.get(subject).cloned().unwrap_or_default()
        };
        let mut closed = false;
        for tx in &senders {
            closed |= tx.send(payload.clone()).await.is_err();
        }
        if closed {
            let mut subs = self.subs.lock().expect("event bus lock");
            if let Some(v) = subs.get_mut(subject) {
                v.retain(|tx| !tx.is_closed());
            }
        }
        Ok(())
    }

    async fn subscribe(&self, subject: &str) -> Result<Subscription, EventError> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        self.subs
            .lock()
            .expect("event bus lock")
            .entry(subject.to_string())
            .or_default()
            .push(tx);
        Ok(ReceiverStream::new(rx).boxed())
    }
}

/// A `Stream` over an mpsc receiver (what tokio-stream's wrapper does, in a few lines).
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::sync::mpsc;

    pub struct ReceiverStream<T>(mpsc::Receiver<T>);

    impl<T> ReceiverStream<T> {
        pub fn new(rx: mpsc::Receiver<T>) -> Self {
            Self(rx)
        }
    }

    impl<T> futures::Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}
