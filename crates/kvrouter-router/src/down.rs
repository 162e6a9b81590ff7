//! Workers taken out of routing because a connection to them failed. A
//! killed worker stays in discovery until its lease expires (seconds); until
//! then every request routed to it would fail, so the first failure takes it
//! out at once. A prober tries each one's address every [`PROBE_EVERY`] and
//! puts it back when it accepts a connection again; discovery removing or
//! re-announcing the worker clears it too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kvrouter_runtime::endpoint::InstanceId;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// How often a down worker's address is tried.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// The workers out of routing, with the address each is probed at.
#[derive(Default)]
pub(crate) struct DownSet {
    down: Mutex<HashMap<InstanceId, String>>,
}

impl DownSet {
    /// Takes `id` out of routing; `true` if it was in.
    pub(crate) fn mark(&self, id: InstanceId, address: &str, why: &str) -> bool {
        let newly = self.down.lock().insert(id, address.to_string()).is_none();
        if newly {
            tracing::warn!(
                worker = id,
                address,
                reason = why,
                "worker taken out of routing until it answers again"
            );
        }
        newly
    }

    /// Puts `id` back (discovery removed or re-announced it).
    pub(crate) fn clear(&self, id: InstanceId) {
        self.down.lock().remove(&id);
    }

    /// The workers out of routing now.
    pub(crate) fn ids(&self) -> Vec<InstanceId> {
        self.down.lock().keys().copied().collect()
    }

    /// Probes the down workers until `cancel`.
    pub(crate) fn spawn_prober(self: &Arc<Self>, cancel: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(PROBE_EVERY) => {}
                }
                let down: Vec<_> = me
                    .down
                    .lock()
                    .iter()
                    .map(|(k, v)| (*k, v.clone()))
                    .collect();
                for (id, address) in down {
                    if reachable(&address).await {
                        tracing::info!(
                            worker = id,
                            address,
                            "worker answers again: back in routing"
                        );
                        me.clear(id);
                    }
                }
            }
        });
    }
}

/// Whether something accepts a connection at `address` (`tcp://h:p`,
/// `http://h:p/…`). A NATS subject cannot be probed this way: it is given
/// back to routing at the next round, and the next failure takes it out again.
async fn reachable(address: &str) -> bool {
    let host_port = if let Some(a) = address.strip_prefix("tcp://") {
        a
    } else if let Some(a) = address.strip_prefix("http://") {
        a.split('/').next().unwrap_or(a)
    } else {
        return true;
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(host_port)).await,
        Ok(Ok(_))
    )
}
