//! NATS core event plane (`NATS_SERVER`, default `nats://localhost:4222`).

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{EventError, EventPlane, Subscription};

/// The NATS URL operators set, with Dynamo's default.
pub fn nats_url(env_value: Option<String>) -> String {
    env_value.unwrap_or_else(|| "nats://localhost:4222".to_string())
}

/// Publish/subscribe through a NATS server.
#[derive(Clone)]
pub struct NatsEvents {
    client: async_nats::Client,
}

impl NatsEvents {
    /// Connects (the client reconnects by itself after a server restart).
    pub async fn connect(url: &str) -> Result<Self, EventError> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(url)
            .await
            .map_err(|e| EventError::Nats(e.to_string()))?;
        Ok(Self { client })
    }

    /// The underlying client (for JetStream).
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// Waits until the server has processed everything sent so far.
    pub async fn flush(&self) -> Result<(), EventError> {
        self.client
            .flush()
            .await
            .map_err(|e| EventError::Nats(e.to_string()))
    }
}

#[async_trait]
impl EventPlane for NatsEvents {
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), EventError> {
        self.client
            .publish(subject.to_string(), payload)
            .await
            .map_err(|e| EventError::Nats(e.to_string()))
    }

    async fn subscribe(&self, subject: &str) -> Result<Subscription, EventError> {
        let sub = self
            .client
            .subscribe(subject.to_string())
            .await
            .map_err(|e| EventError::Nats(e.to_string()))?;
        // The SUB must reach the server before "messages published after this
        // returns" can hold.
        self.flush().await?;
        Ok(sub.map(|m| m.payload).boxed())
    }
}
