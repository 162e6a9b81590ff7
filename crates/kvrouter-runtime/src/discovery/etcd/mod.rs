//! Discovery in etcd (`ETCD_ENDPOINTS`, default `http://localhost:2379`).
//!
//! An instance is the key `v1/instances/{ns}/{component}/{endpoint}/{id}`
//! (value: the instance as JSON) attached to a lease of the registration's TTL,
//! kept alive every third of it; dropping the registration revokes the lease,
//! a dead process's lease simply expires. A lease that etcd no longer knows
//! (a replaced or restored cluster, expiry during a partition) is replaced
//! and the key written again, see [`lease`]. A watch reads the prefix, reports it,
//! and watches from the next revision; when the watch stream breaks (etcd
//! restarted, connection lost) it re-reads the prefix, reports the difference,
//! and resumes from the new revision, so no change is lost or reported twice.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;

mod lease;

use super::{Discovery, DiscoveryError, DiscoveryEvent, Registration, Watch};
use crate::endpoint::{EndpointId, Instance, InstanceId};

const ROOT: &str = "v1/instances/";

/// The etcd endpoints operators set (comma-separated), with Dynamo's default.
pub fn etcd_endpoints(env_value: Option<String>) -> Vec<String> {
    env_value
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| vec!["http://localhost:2379".to_string()])
}

fn err(e: etcd_client::Error) -> DiscoveryError {
    DiscoveryError::Etcd(e.to_string())
}

/// Discovery in an etcd cluster.
#[derive(Clone)]
pub struct EtcdDiscovery {
    client: Client,
}

impl EtcdDiscovery {
    /// Connects to the cluster.
    pub async fn connect(endpoints: &[String]) -> Result<Self, DiscoveryError> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let client = Client::connect(endpoints, Some(opts)).await.map_err(err)?;
        Ok(Self { client })
    }

    fn prefix(e: &EndpointId) -> String {
        format!("{ROOT}{}", e.key_prefix())
    }

    async fn snapshot(
        client: &mut Client,
        prefix: &str,
    ) -> Result<(BTreeMap<InstanceId, Instance>, i64), DiscoveryError> {
        let resp = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(err)?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut out = BTreeMap::new();
        for kv in resp.kvs() {
            match serde_json::from_slice::<Instance>(kv.value()) {
                Ok(i) => {
                    out.insert(i.id, i);
                }
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "skipping corrupt instance record")
                }
            }
        }
        Ok((out, revision))
    }
}

fn key_of(instance: &Instance) -> String {
    format!(
        "{}{}",
        EtcdDiscovery::prefix(&instance.endpoint),
        instance.id
    )
}

fn id_of(key: &[u8]) -> Option<InstanceId> {
    std::str::from_utf8(key)
        .ok()?
        .rsplit('/')
        .next()?
        .parse()
        .ok()
}

#[async_trait]
impl Discovery for EtcdDiscovery {
    async fn register(
        &self,
        instance: Instance,
        ttl: Duration,
    ) -> Result<Registration, DiscoveryError> {
        lease::register(self.client.clone(), key_of(&instance), instance, ttl).await
    }

    async fn list(&self, endpoint: &EndpointId) -> Result<Vec<Instance>, DiscoveryError> {
        let mut client = self.client.clone();
        Ok(Self::snapshot(&mut client, &Self::prefix(endpoint))
            .await?
            .0
            .into_values()
            .collect())
    }

    async fn watch(&self, endpoint: &EndpointId) -> Result<Watch, DiscoveryError> {
        let prefix = Self::prefix(endpoint);
        let mut client = self.client.clone();
        let (mut known, mut revision) = Self::snapshot(&mut client, &prefix).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        for i in known.values() {
            let _ = tx.send(DiscoveryEvent::Added(i.clone()));
        }
        tokio::spawn(async move {
            use backoff::backoff::Backoff;
            // Resyncs start 100 ms after a lost watch and back off to 5 s
            // while etcd stays away (a replaced server, a partition).
            let mut retry = backoff::ExponentialBackoffBuilder::new()
                .with_initial_interval(Duration::from_millis(100))
                .with_max_interval(Duration::from_secs(5))
                .with_max_elapsed_time(None)
                .build();
            loop {
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1);
                match client.watch(prefix.as_str(), Some(opts)).await {
                    Ok(mut stream) => loop {
                        let msg = tokio::select! {
                            _ = tx.closed() => return,
                            m = stream.message() => m,
                        };
                        let Ok(Some(resp)) = msg else { break };
                        if resp.canceled() {
                            break;
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            revision = revision.max(kv.mod_revision());
                            match ev.event_type() {
                                EventType::Put => {
                                    if let Ok(i) = serde_json::from_slice::<Instance>(kv.value()) {
                                        known.insert(i.id, i.clone());
                                        let _ = tx.send(DiscoveryEvent::Added(i));
                                    }
                                }
                                EventType::Delete => {
                                    if let Some(id) = id_of(kv.key())
                                        && known.remove(&id).is_some()
                                    {
                                        let _ = tx.send(DiscoveryEvent::Removed(id));
                                    }
                                }
                            }
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "etcd watch failed; resyncing"),
                }
                if tx.is_closed() {
                    return;
                }
                // Resync: re-read, report the difference, resume after the new revision.
                let wait = retry.next_backoff().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                match Self::snapshot(&mut client, &prefix).await {
                    Ok((now, rev)) => {
                        super::report_changes(&known, &now, &tx);
                        known = now;
                        revision = rev;
                        retry.reset();
                    }
                    Err(e) => tracing::warn!(error = %e, "etcd resync failed; retrying"),
                }
            }
        });
        Ok(Watch { rx })
    }
}
