//! In-process discovery: a map and a list of watchers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Discovery, DiscoveryError, DiscoveryEvent, Registration, Watch};
use crate::endpoint::{EndpointId, Instance};

#[derive(Default)]
struct Inner {
    instances: BTreeMap<String, Instance>,
    watchers: Vec<(String, mpsc::UnboundedSender<DiscoveryEvent>)>,
}

impl Inner {
    fn notify(&mut self, prefix: &str, ev: DiscoveryEvent) {
        // Watchers whose receiver is gone are dropped here.
        self.watchers
            .retain(|(p, tx)| p != prefix || tx.send(ev.clone()).is_ok());
    }
}

/// Discovery within one process (leases end when the handle drops).
#[derive(Clone, Default)]
pub struct MemDiscovery {
    inner: Arc<Mutex<Inner>>,
}

impl MemDiscovery {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn key(i: &Instance) -> String {
    format!("{}{}", i.endpoint.key_prefix(), i.id)
}

#[async_trait]
impl Discovery for MemDiscovery {
    async fn register(
        &self,
        instance: Instance,
        _ttl: Duration,
    ) -> Result<Registration, DiscoveryError> {
        let prefix = instance.endpoint.key_prefix();
        let k = key(&instance);
        let id = instance.id;
        {
            let mut inner = self.inner.lock().expect("discovery lock");
            inner.instances.insert(k.clone(), instance.clone());
            inner.notify(&prefix, DiscoveryEvent::Added(instance));
        }
        let store = self.inner.clone();
        Ok(Registration::new(
            CancellationToken::new(),
            Some(Box::new(move || {
                let mut inner = store.lock().expect("discovery lock");
                if inner.instances.remove(&k).is_some() {
                    inner.notify(&prefix, DiscoveryEvent::Removed(id));
                }
            })),
        ))
    }

    async fn list(&self, endpoint: &EndpointId) -> Result<Vec<Instance>, DiscoveryError> {
        let prefix = endpoint.key_prefix();
        let inner = self.inner.lock().expect("discovery lock");
        Ok(inner
            .instances
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect())
    }

    async fn watch(&self, endpoint: &EndpointId) -> Result<Watch, DiscoveryError> {
        let prefix = endpoint.key_prefix();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.inner.lock().expect("discovery lock");
        for (_, i) in inner
            .instances
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
        {
            let _ = tx.send(DiscoveryEvent::Added(i.clone()));
        }
        inner.watchers.push((prefix, tx));
        Ok(Watch { rx })
    }
}
