//! The event plane: publish/subscribe of KV events and load reports.
//!
//! Subjects are component-scoped strings (`EndpointId::subject`). Delivery is
//! at-most-once and in order per publisher, as NATS core gives it; gaps are
//! detected above this layer by the events' own ids. [`EventPlane`] covers the
//! broker-style planes (in-process, NATS); ZeroMQ is point-to-point (a bound
//! publisher, connecting subscribers) and has its own two types; JetStream adds
//! durability ([`DurableEvents`]).

mod inproc;
mod jetstream;
mod nats;
mod zmq;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

pub use inproc::InProcEvents;
pub use jetstream::{
    Delivery, DurableConsumer, DurableEvents, DurableNames, RETENTION, SNAPSHOT_OBJECT,
    SnapshotStore, open_kv_stream, slug,
};
pub use nats::{NatsEvents, nats_url};
pub use zmq::{ZmqMessage, ZmqPublisher, ZmqSubscriber};

/// Messages of one subscription, in publish order.
pub type Subscription = BoxStream<'static, Bytes>;

/// Why publishing or subscribing failed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The NATS connection failed.
    #[error("nats: {0}")]
    Nats(String),
    /// A ZeroMQ socket failed.
    #[error("zmq: {0}")]
    Zmq(String),
    /// A message did not have the expected shape.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Where events are published and subscribed to.
#[async_trait]
pub trait EventPlane: Send + Sync {
    /// Publishes one message.
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), EventError>;
    /// Subscribes to a subject; messages published after this returns are delivered.
    async fn subscribe(&self, subject: &str) -> Result<Subscription, EventError>;
}
