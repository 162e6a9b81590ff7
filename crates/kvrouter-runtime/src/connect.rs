//! A [`Node`] built from its configuration: which discovery store, which
//! event plane, which request plane, and where the servers are. The binary
//! resolves flags and environment into a [`NodeConfig`]; connecting to etcd
//! and NATS, and choosing the planes, happens here, in one place.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::discovery::{Discovery, DiscoveryError, EtcdDiscovery, FileDiscovery, MemDiscovery};
use crate::events::{EventError, EventPlane, InProcEvents, NatsEvents};
use crate::node::{Node, Plane};

/// Where instances register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// An etcd cluster at these client URLs.
    Etcd(Vec<String>),
    /// A directory shared by the processes of one host, polled this often.
    File(PathBuf, Duration),
    /// This process only.
    Mem,
}

/// Where KV events and load travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventPlaneKind {
    /// NATS core (and JetStream in durable mode).
    Nats,
    /// Queues inside this process.
    InProcess,
}

/// Everything a node needs to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// The discovery store.
    pub store: StoreConfig,
    /// The event plane.
    pub events: EventPlaneKind,
    /// How this process serves its endpoints.
    pub plane: Plane,
    /// The NATS server, used when the event or request plane is NATS.
    pub nats_url: String,
    /// Address listeners bind.
    pub bind_host: String,
    /// Host advertised in discovery, if not the bound one.
    pub advertise_host: Option<String>,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// etcd could not be reached.
    #[error("connecting to etcd at {endpoints}: {source}")]
    Etcd {
        /// The URLs tried.
        endpoints: String,
        /// Why.
        #[source]
        source: DiscoveryError,
    },
    /// NATS could not be reached.
    #[error("connecting to NATS at {url}: {source}")]
    Nats {
        /// The URL tried.
        url: String,
        /// Why.
        #[source]
        source: EventError,
    },
}

impl NodeConfig {
    /// Whether a NATS connection is needed.
    pub fn needs_nats(&self) -> bool {
        self.events == EventPlaneKind::Nats || self.plane == Plane::Nats
    }
}

impl Node {
    /// Connects to the configured servers and builds the node.
    pub async fn connect(cfg: &NodeConfig) -> Result<Node, ConnectError> {
        let discovery: Arc<dyn Discovery> = match &cfg.store {
            StoreConfig::Etcd(endpoints) => {
                Arc::new(EtcdDiscovery::connect(endpoints).await.map_err(|source| {
                    ConnectError::Etcd {
                        endpoints: endpoints.join(","),
                        source,
                    }
                })?)
            }
            StoreConfig::File(root, poll) => Arc::new(FileDiscovery::new(root.clone(), *poll)),
            StoreConfig::Mem => {
                tracing::warn!(
                    "in-memory discovery: this process only sees instances it registers itself"
                );
                Arc::new(MemDiscovery::new())
            }
        };
        let nats =
            if cfg.needs_nats() {
                Some(NatsEvents::connect(&cfg.nats_url).await.map_err(|source| {
                    ConnectError::Nats {
                        url: cfg.nats_url.clone(),
                        source,
                    }
                })?)
            } else {
                None
            };
        let events: Arc<dyn EventPlane> = match (&nats, cfg.events) {
            (Some(n), EventPlaneKind::Nats) => Arc::new(n.clone()),
            _ => Arc::new(InProcEvents::new()),
        };
        let mut node = Node::new(
            discovery,
            events,
            cfg.plane,
            nats.as_ref().map(NatsEvents::client),
            cfg.bind_host.clone(),
        );
        node.advertise_host = cfg.advertise_host.clone();
        Ok(node)
    }
}
