//! A registration's lease: granted, kept alive every third of its TTL, and
//! healed when etcd forgets it.
//!
//! etcd answers a keep-alive for a lease it does not know with a TTL of 0. That
//! happens when the cluster was replaced or restored from a backup, or when the
//! lease expired while this process was cut off; the key went with the lease,
//! so the instance is invisible although it runs. The keeper then grants a new
//! lease and writes the key again. After any failed renewal it also checks the
//! key itself once the cluster answers again, because a restored cluster may
//! hold the lease but not the key.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use tokio_util::sync::CancellationToken;

use super::err;
use crate::discovery::{DiscoveryError, Registration};
use crate::endpoint::Instance;

/// Writes `instance` under `key` with a lease of `ttl` and keeps it there.
pub(super) async fn register(
    client: Client,
    key: String,
    instance: Instance,
    ttl: Duration,
) -> Result<Registration, DiscoveryError> {
    let value = serde_json::to_vec(&instance).map_err(|e| DiscoveryError::Corrupt {
        key: key.clone(),
        message: e.to_string(),
    })?;
    let ttl_secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
    let lease = grant_and_put(&mut client.clone(), &key, &value, ttl_secs)
        .await
        .map_err(err)?;
    let current = Arc::new(AtomicI64::new(lease));
    let cancel = CancellationToken::new();
    let keeper = Keeper {
        client: client.clone(),
        key,
        value,
        ttl_secs,
        current: current.clone(),
    };
    tokio::spawn(keeper.run(cancel.clone()));
    Ok(Registration::remote(
        cancel,
        Box::new(move || {
            let lease = current.load(Ordering::Relaxed);
            let mut revoker = client;
            Box::pin(async move {
                let _ = revoker.lease_revoke(lease).await;
            })
        }),
    ))
}

async fn grant_and_put(
    client: &mut Client,
    key: &str,
    value: &[u8],
    ttl_secs: i64,
) -> Result<i64, etcd_client::Error> {
    let lease = client.lease_grant(ttl_secs, None).await?.id();
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await?;
    Ok(lease)
}

/// What one keep-alive round found.
enum Renewal {
    Renewed,
    /// etcd answered: it does not know the lease.
    Gone,
    /// No answer (etcd down, unreachable, or the stream broke).
    Failed,
}

struct Keeper {
    client: Client,
    key: String,
    value: Vec<u8>,
    ttl_secs: i64,
    /// The lease in use, read by the revoker on drop.
    current: Arc<AtomicI64>,
}

impl Keeper {
    async fn run(mut self, cancel: CancellationToken) {
        let period = Duration::from_secs_f64((self.ttl_secs as f64 / 3.0).max(0.2));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stream = None;
        // False after a failed round: the key is checked once etcd answers again.
        let mut verified = true;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let round = tokio::select! {
                _ = cancel.cancelled() => return,
                r = tokio::time::timeout(period, self.renew(&mut stream)) => r.unwrap_or(Renewal::Failed),
            };
            match round {
                Renewal::Renewed if !verified => verified = self.verify_key().await,
                Renewal::Renewed => {}
                Renewal::Gone => {
                    stream = None;
                    verified = self.replace_lease().await;
                }
                Renewal::Failed => {
                    if verified {
                        tracing::warn!(
                            key = %self.key,
                            "etcd lease keep-alive failed; retrying every {period:?}"
                        );
                    }
                    stream = None;
                    verified = false;
                }
            }
        }
    }

    async fn renew(&mut self, stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>) -> Renewal {
        let Some((keeper, responses)) = stream.as_mut() else {
            // Opening a keeper renews once and reads the answer.
            let lease = self.current.load(Ordering::Relaxed);
            return match self.client.lease_keep_alive(lease).await {
                Ok(s) => {
                    *stream = Some(s);
                    Renewal::Renewed
                }
                Err(etcd_client::Error::LeaseKeepAliveError(m)) if m == "lease not found" => {
                    Renewal::Gone
                }
                Err(_) => Renewal::Failed,
            };
        };
        if keeper.keep_alive().await.is_err() {
            return Renewal::Failed;
        }
        match responses.message().await {
            Ok(Some(r)) if r.ttl() > 0 => Renewal::Renewed,
            Ok(Some(_)) => Renewal::Gone,
            _ => Renewal::Failed,
        }
    }

    /// A new lease and the key written again; false if etcd failed meanwhile.
    async fn replace_lease(&mut self) -> bool {
        let old = self.current.load(Ordering::Relaxed);
        match grant_and_put(&mut self.client, &self.key, &self.value, self.ttl_secs).await {
            Ok(lease) => {
                self.current.store(lease, Ordering::Relaxed);
                tracing::warn!(
                    key = %self.key,
                    old_lease = old,
                    lease,
                    "etcd no longer knew this registration's lease (cluster replaced or restored, \
                     or the lease expired while etcd was unreachable); registered again"
                );
                true
            }
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "re-registering in etcd failed; retrying");
                false
            }
        }
    }

    /// Writes the key again if it is missing or not ours; false if etcd failed.
    async fn verify_key(&mut self) -> bool {
        let lease = self.current.load(Ordering::Relaxed);
        let found = match self.client.get(self.key.as_str(), None).await {
            Ok(r) => r
                .kvs()
                .first()
                .is_some_and(|kv| kv.value() == self.value.as_slice() && kv.lease() == lease),
            Err(_) => return false,
        };
        if found {
            return true;
        }
        let put = self
            .client
            .put(
                self.key.as_str(),
                self.value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await;
        match put {
            Ok(_) => {
                tracing::warn!(key = %self.key, "registration was missing from etcd; written again");
                true
            }
            // The lease itself is gone: the next round replaces it.
            Err(_) => false,
        }
    }
}
