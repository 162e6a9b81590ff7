//! Discovery through a directory shared by the processes of one host.
//!
//! Each instance is a JSON file `ROOT/ns/component/endpoint/<id>.json` holding
//! the instance and its lease deadline. Files are written atomically (write a
//! temporary file, then rename). The registering process rewrites its file
//! every third of the TTL; a reader ignores, and removes, files whose deadline
//! passed, so an instance whose process died disappears within one TTL.
//! Watches poll the directory (every `poll` interval) and report differences.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Discovery, DiscoveryError, DiscoveryEvent, Registration, Watch};
use crate::endpoint::{EndpointId, Instance, InstanceId};

#[derive(Serialize, Deserialize)]
struct Record {
    instance: Instance,
    expires_at_ms: u64,
}

/// Discovery in a shared directory (`DYN_FILE_KV`).
#[derive(Clone, Debug)]
pub struct FileDiscovery {
    root: PathBuf,
    poll: Duration,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl FileDiscovery {
    /// A store rooted at `root` (created if missing), polled every `poll`.
    pub fn new(root: impl Into<PathBuf>, poll: Duration) -> Self {
        Self {
            root: root.into(),
            poll,
        }
    }

    /// The default root: `DYN_FILE_KV` if set, else a directory under the temp dir.
    pub fn default_root(env_value: Option<String>) -> PathBuf {
        env_value.map_or_else(
            || std::env::temp_dir().join("kvrouter-discovery"),
            PathBuf::from,
        )
    }

    fn dir(&self, e: &EndpointId) -> PathBuf {
        self.root
            .join(&e.namespace)
            .join(&e.component)
            .join(&e.endpoint)
    }

    async fn write(path: &Path, record: &Record) -> std::io::Result<()> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let bytes = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        tokio::fs::write(&tmp, bytes).await?;
        tokio::fs::rename(&tmp, path).await
    }

    /// Live instances by id, removing expired records.
    async fn scan(dir: &Path) -> Result<BTreeMap<InstanceId, Instance>, DiscoveryError> {
        let mut out = BTreeMap::new();
        let mut rd = match tokio::fs::read_dir(dir).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        let now = now_ms();
        while let Some(entry) = rd.next_entry().await? {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Ok(bytes) = tokio::fs::read(&path).await else {
                continue; // removed between listing and reading
            };
            match serde_json::from_slice::<Record>(&bytes) {
                Ok(r) if r.expires_at_ms >= now => {
                    out.insert(r.instance.id, r.instance);
                }
                Ok(_) => {
                    // Expired: its owner stopped renewing. Best effort, others may race us.
                    let _ = tokio::fs::remove_file(&path).await;
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping corrupt discovery record");
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Discovery for FileDiscovery {
    async fn register(
        &self,
        instance: Instance,
        ttl: Duration,
    ) -> Result<Registration, DiscoveryError> {
        let dir = self.dir(&instance.endpoint);
        tokio::fs::create_dir_all(&dir).await?;
        let path = dir.join(format!("{}.json", instance.id));
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let mut record = Record {
            instance,
            expires_at_ms: now_ms() + ttl_ms,
        };
        Self::write(&path, &record).await?;
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let heartbeat_path = path.clone();
        tokio::spawn(async move {
            // A zero period would panic; renew at least every 10 ms.
            let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(10)));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        record.expires_at_ms = now_ms() + ttl_ms;
                        if let Err(e) = Self::write(&heartbeat_path, &record).await {
                            tracing::warn!(file = %heartbeat_path.display(), error = %e, "discovery heartbeat failed");
                        }
                    }
                }
            }
        });
        Ok(Registration::new(
            cancel,
            Some(Box::new(move || {
                let _ = std::fs::remove_file(&path);
            })),
        ))
    }

    async fn list(&self, endpoint: &EndpointId) -> Result<Vec<Instance>, DiscoveryError> {
        Ok(Self::scan(&self.dir(endpoint))
            .await?
            .into_values()
            .collect())
    }

    async fn watch(&self, endpoint: &EndpointId) -> Result<Watch, DiscoveryError> {
        let dir = self.dir(endpoint);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut known = Self::scan(&dir).await?;
        for i in known.values() {
            let _ = tx.send(DiscoveryEvent::Added(i.clone()));
        }
        let poll = self.poll.max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            loop {
                tick.tick().await;
                if tx.is_closed() {
                    break;
                }
                let now = match Self::scan(&dir).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "discovery scan failed");
                        continue;
                    }
                };
                super::report_changes(&known, &now, &tx);
                known = now;
            }
        });
        Ok(Watch { rx })
    }
}
