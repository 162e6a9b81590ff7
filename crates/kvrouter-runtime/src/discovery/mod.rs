//! Discovery: instances register under an endpoint with a lease; clients watch.
//!
//! [`Discovery`] is the seam; [`MemDiscovery`] serves one process (tests and
//! `serve`), [`FileDiscovery`] the processes of one host through a shared
//! directory, [`EtcdDiscovery`] a fleet (leases with keep-alive, prefix watches). A registration lives as long as its [`Registration`] handle (and,
//! for stores with leases, as long as its holder keeps renewing it: a process
//! that dies disappears within the lease's TTL). A [`Watch`] first reports every
//! current instance as added, then changes as they happen.

mod etcd;
mod file;
mod mem;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::endpoint::{EndpointId, Instance, InstanceId};
pub use etcd::{EtcdDiscovery, etcd_endpoints};
pub use file::FileDiscovery;
pub use mem::MemDiscovery;

/// A change to an endpoint's instances.
#[derive(Debug, Clone, PartialEq)]
pub enum DiscoveryEvent {
    /// An instance appeared (or was already there when the watch started).
    Added(Instance),
    /// An instance left or its lease expired.
    Removed(InstanceId),
}

/// Why a discovery operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The store could not be read or written.
    #[error("discovery store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The etcd cluster failed or is unreachable.
    #[error("etcd: {0}")]
    Etcd(String),
    /// A stored record is not valid.
    #[error("invalid discovery record {key}: {message}")]
    Corrupt {
        /// The record.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// How a registration is removed from its store.
enum Deregister {
    /// At once (in-memory and file stores).
    Now(Box<dyn FnOnce() + Send>),
    /// Over the network (etcd): awaited by [`Registration::close`], spawned on drop.
    Later(Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send>),
}

/// Keeps an instance registered; dropping it deregisters.
pub struct Registration {
    cancel: CancellationToken,
    on_drop: Option<Deregister>,
}

/// How long [`Registration::close`] waits for the store.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

impl Registration {
    pub(crate) fn new(
        cancel: CancellationToken,
        on_drop: Option<Box<dyn FnOnce() + Send>>,
    ) -> Self {
        Self {
            cancel,
            on_drop: on_drop.map(Deregister::Now),
        }
    }

    pub(crate) fn remote(
        cancel: CancellationToken,
        on_close: Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send>,
    ) -> Self {
        Self {
            cancel,
            on_drop: Some(Deregister::Later(on_close)),
        }
    }

    /// Deregisters and waits (up to 2 s) until the store has it: how a
    /// process that stops gracefully leaves before it stops serving.
    pub async fn close(mut self) {
        self.cancel.cancel();
        match self.on_drop.take() {
            Some(Deregister::Now(f)) => f(),
            Some(Deregister::Later(f)) => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, f()).await;
            }
            None => {}
        }
    }

    /// Stops renewing the lease without deregistering, as a crashed process
    /// would: the instance disappears once its TTL runs out.
    pub fn abandon(mut self) {
        self.on_drop = None;
        self.cancel.cancel();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.cancel.cancel();
        match self.on_drop.take() {
            Some(Deregister::Now(f)) => f(),
            // Drop cannot wait: in the background (the TTL is the backstop).
            Some(Deregister::Later(f)) => {
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(f());
                }
            }
            None => {}
        }
    }
}

/// A stream of changes to one endpoint's instances.
pub struct Watch {
    pub(crate) rx: mpsc::UnboundedReceiver<DiscoveryEvent>,
}

impl Watch {
    /// The next change; `None` when the store is gone.
    pub async fn next(&mut self) -> Option<DiscoveryEvent> {
        self.rx.recv().await
    }
}

/// Reports the difference between two snapshots of an endpoint's instances.
pub(crate) fn report_changes(
    known: &std::collections::BTreeMap<InstanceId, Instance>,
    now: &std::collections::BTreeMap<InstanceId, Instance>,
    tx: &mpsc::UnboundedSender<DiscoveryEvent>,
) {
    for id in known.keys().filter(|id| !now.contains_key(id)) {
        let _ = tx.send(DiscoveryEvent::Removed(*id));
    }
    for (id, i) in now {
        if known.get(id) != Some(i) {
            let _ = tx.send(DiscoveryEvent::Added(i.clone()));
        }
    }
}

/// Where instances register and are found.
#[async_trait]
pub trait Discovery: Send + Sync {
    /// Registers `instance` with a lease of `ttl`, renewed while the handle lives.
    async fn register(
        &self,
        instance: Instance,
        ttl: Duration,
    ) -> Result<Registration, DiscoveryError>;
    /// The live instances of an endpoint.
    async fn list(&self, endpoint: &EndpointId) -> Result<Vec<Instance>, DiscoveryError>;
    /// Current instances as `Added`, then every change.
    async fn watch(&self, endpoint: &EndpointId) -> Result<Watch, DiscoveryError>;
}
