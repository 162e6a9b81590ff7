//! The runtime flags' second stage: with the settings only the environment
//! gives (read from the same injected environment as every flag), they become
//! the runtime's typed [`NodeConfig`].

use std::time::Duration;

use kvrouter_runtime::connect::{EventPlaneKind, NodeConfig, StoreConfig};
use kvrouter_runtime::discovery::{FileDiscovery, etcd_endpoints};
use kvrouter_runtime::events::nats_url;
use kvrouter_runtime::node::Plane;

use super::args::{EventPlane, RequestPlane, RuntimeArgs, StoreKv};
use super::env::EnvSource;

/// The variables that have no flag, as Dynamo's components read them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeEnv {
    /// `ETCD_ENDPOINTS`: comma-separated client URLs.
    pub etcd_endpoints: Option<String>,
    /// `NATS_SERVER`.
    pub nats_server: Option<String>,
    /// `DYN_FILE_KV`: the file store's directory.
    pub file_kv: Option<String>,
    /// `DYN_TCP_ADVERTISE_HOST`: the host put in discovery.
    pub tcp_advertise_host: Option<String>,
    /// `DYN_SYSTEM_PORT`: where `/metrics` of a headless service listens.
    pub system_port: Option<String>,
}

impl RuntimeEnv {
    /// Reads the variables from `env` (empty values count as unset).
    pub fn from_source(env: &dyn EnvSource) -> Self {
        let get = |n: &str| env.get(n).filter(|v| !v.is_empty());
        Self {
            etcd_endpoints: get("ETCD_ENDPOINTS"),
            nats_server: get("NATS_SERVER"),
            file_kv: get("DYN_FILE_KV"),
            tcp_advertise_host: get("DYN_TCP_ADVERTISE_HOST"),
            system_port: get("DYN_SYSTEM_PORT"),
        }
    }
}

impl RuntimeArgs {
    /// The node this process runs, binding listeners on `bind_host`.
    pub fn node_config(&self, bind_host: &str) -> Result<NodeConfig, String> {
        let store = match self.store_kv.unwrap_or(StoreKv::Etcd) {
            StoreKv::Etcd => StoreConfig::Etcd(etcd_endpoints(self.env.etcd_endpoints.clone())),
            StoreKv::File => StoreConfig::File(
                FileDiscovery::default_root(self.env.file_kv.clone()),
                Duration::from_millis(200),
            ),
            StoreKv::Mem => StoreConfig::Mem,
        };
        let plane = match self.request_plane {
            RequestPlane::Tcp => Plane::Tcp,
            RequestPlane::Nats => Plane::Nats,
            RequestPlane::Http => Plane::Http,
        };
        let events = match self.event_plane {
            EventPlane::Nats => EventPlaneKind::Nats,
            EventPlane::Zmq => {
                return Err(
                    "--event-plane zmq: engine workers publish ZeroMQ directly to \
                            routers; between kvrouter processes use --event-plane nats"
                        .into(),
                );
            }
        };
        Ok(NodeConfig {
            store,
            events,
            plane,
            nats_url: nats_url(self.env.nats_server.clone()),
            bind_host: bind_host.to_string(),
            advertise_host: self.env.tcp_advertise_host.clone(),
        })
    }
}
