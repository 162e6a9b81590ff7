//! Durable events on NATS JetStream: a stream, durable consumers, purging up
//! to what every consumer acknowledged, and an object store for snapshots.
//!
//! These are the primitives the router's durable mode (`--durable-kv-events`)
//! is built from: workers publish to the stream; each router is a durable
//! consumer (it resumes where it acknowledged after a restart); when the stream
//! grows past a threshold a router uploads a snapshot of its index and purges
//! the messages every consumer has acknowledged, so no replica loses events.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncReadExt;

use super::EventError;
use crate::endpoint::EndpointId;

// Naming of the KV-event stream shared by workers (publishers) and routers
// (consumers, snapshots), as the reference names them.

/// The snapshot object's name.
pub const SNAPSHOT_OBJECT: &str = "radix-state";
/// How long the stream keeps events (the reference's retention).
pub const RETENTION: Duration = Duration::from_secs(3600);

/// `.` and `_` become `-` (JetStream names).
pub fn slug(s: &str) -> String {
    s.replace(['.', '_'], "-")
}

/// The stream, its subject and the snapshot bucket of an endpoint's KV events.
pub struct DurableNames {
    /// Subject the workers publish on.
    pub subject: String,
    /// Stream name.
    pub stream: String,
    /// Object-store bucket.
    pub bucket: String,
}

impl DurableNames {
    /// The names for `endpoint`'s component.
    pub fn of(endpoint: &EndpointId) -> Self {
        let subject = crate::subjects::kv_events(endpoint);
        Self {
            stream: slug(&subject),
            bucket: slug(&crate::subjects::radix_bucket(endpoint)),
            subject,
        }
    }
}

/// Opens the stream an endpoint's workers publish to (creating it if needed).
pub async fn open_kv_stream(
    client: async_nats::Client,
    endpoint: &EndpointId,
) -> Result<DurableEvents, EventError> {
    let n = DurableNames::of(endpoint);
    DurableEvents::open(client, &n.stream, &n.subject, RETENTION).await
}

fn err(e: impl std::fmt::Display) -> EventError {
    EventError::Nats(e.to_string())
}

/// A JetStream stream of events on one subject.
#[derive(Clone)]
pub struct DurableEvents {
    js: jetstream::Context,
    name: String,
    subject: String,
}

impl DurableEvents {
    /// Opens (creating if needed) stream `name` over `subject`, keeping messages for `max_age`.
    pub async fn open(
        client: async_nats::Client,
        name: &str,
        subject: &str,
        max_age: Duration,
    ) -> Result<Self, EventError> {
        let js = jetstream::new(client);
        js.get_or_create_stream(stream::Config {
            name: name.to_string(),
            subjects: vec![subject.to_string()],
            max_age,
            ..Default::default()
        })
        .await
        .map_err(err)?;
        Ok(Self {
            js,
            name: name.to_string(),
            subject: subject.to_string(),
        })
    }

    /// Publishes and waits for the stream's acknowledgement; returns the sequence.
    pub async fn publish(&self, payload: Bytes) -> Result<u64, EventError> {
        let ack = self
            .js
            .publish(self.subject.clone(), payload)
            .await
            .map_err(err)?
            .await
            .map_err(err)?;
        Ok(ack.sequence)
    }

    /// A durable consumer named `durable` (resumes after its last acknowledgement).
    ///
    /// Messages delivered but not acknowledged (a consumer that restarted) are
    /// redelivered after `ack_wait`; events are idempotent, so a short wait
    /// costs only duplicates.
    pub async fn consumer(
        &self,
        durable: &str,
        ack_wait: Duration,
    ) -> Result<DurableConsumer, EventError> {
        let stream = self.js.get_stream(&self.name).await.map_err(err)?;
        let c: consumer::PullConsumer = stream
            .get_or_create_consumer(
                durable,
                consumer::pull::Config {
                    durable_name: Some(durable.to_string()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait,
                    ..Default::default()
                },
            )
            .await
            .map_err(err)?;
        let messages = c.messages().await.map_err(err)?;
        Ok(DurableConsumer { messages })
    }

    /// Removes a consumer (a router that left for good).
    pub async fn delete_consumer(&self, durable: &str) -> Result<(), EventError> {
        let stream = self.js.get_stream(&self.name).await.map_err(err)?;
        stream.delete_consumer(durable).await.map_err(err)?;
        Ok(())
    }

    /// Messages in the stream now.
    pub async fn message_count(&self) -> Result<u64, EventError> {
        let mut stream = self.js.get_stream(&self.name).await.map_err(err)?;
        Ok(stream.info().await.map_err(err)?.state.messages)
    }

    /// Purges every message all consumers have acknowledged; returns the
    /// sequence purged up to (inclusive), or 0 when nothing could be.
    pub async fn purge_acknowledged(&self) -> Result<u64, EventError> {
        let stream = self.js.get_stream(&self.name).await.map_err(err)?;
        let infos: Vec<consumer::Info> = stream.consumers().try_collect().await.map_err(err)?;
        let Some(floor) = infos.iter().map(|i| i.ack_floor.stream_sequence).min() else {
            return Ok(0);
        };
        if floor == 0 {
            return Ok(0);
        }
        stream.purge().sequence(floor + 1).await.map_err(err)?;
        Ok(floor)
    }

    /// Drops every message (`--router-reset-states`).
    pub async fn purge_all(&self) -> Result<(), EventError> {
        let stream = self.js.get_stream(&self.name).await.map_err(err)?;
        stream.purge().await.map_err(err)?;
        Ok(())
    }

    /// The object store `bucket` (created if needed), for snapshots.
    pub async fn snapshots(&self, bucket: &str) -> Result<SnapshotStore, EventError> {
        let store = match self.js.get_object_store(bucket).await {
            Ok(s) => s,
            Err(_) => self
                .js
                .create_object_store(jetstream::object_store::Config {
                    bucket: bucket.to_string(),
                    ..Default::default()
                })
                .await
                .map_err(err)?,
        };
        Ok(SnapshotStore { store })
    }
}

/// One durable consumer's message feed.
pub struct DurableConsumer {
    messages: consumer::pull::Stream,
}

/// A delivered message; acknowledge it once applied.
pub struct Delivery {
    /// Stream sequence.
    pub sequence: u64,
    /// The event.
    pub payload: Bytes,
    message: jetstream::Message,
}

impl Delivery {
    /// Acknowledges the message (it will not be redelivered to this consumer).
    pub async fn ack(self) -> Result<(), EventError> {
        self.message.ack().await.map_err(err)
    }
}

impl DurableConsumer {
    /// The next message; `None` when the stream ends.
    pub async fn next(&mut self) -> Option<Result<Delivery, EventError>> {
        let m = self.messages.next().await?;
        Some(m.map_err(err).and_then(|message| {
            let sequence = message.info().map_err(err)?.stream_sequence;
            Ok(Delivery {
                sequence,
                payload: message.payload.clone(),
                message,
            })
        }))
    }
}

/// Named blobs in a JetStream object store.
pub struct SnapshotStore {
    store: jetstream::object_store::ObjectStore,
}

impl SnapshotStore {
    /// Stores `bytes` under `name`, replacing any previous version.
    pub async fn put(&self, name: &str, bytes: &[u8]) -> Result<(), EventError> {
        let mut reader = bytes;
        self.store.put(name, &mut reader).await.map_err(err)?;
        Ok(())
    }

    /// The blob stored under `name`, if any.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, EventError> {
        let mut object = match self.store.get(name).await {
            Ok(o) => o,
            Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => {
                return Ok(None);
            }
            Err(e) => return Err(err(e)),
        };
        let mut out = Vec::new();
        object.read_to_end(&mut out).await.map_err(err)?;
        Ok(Some(out))
    }

    /// Deletes `name` (no error when absent).
    pub async fn delete(&self, name: &str) -> Result<(), EventError> {
        match self.store.delete(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == jetstream::object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}
