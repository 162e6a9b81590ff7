//! A pool of engine workers seen through the runtime: discovery keeps the
//! router's worker set current, the event plane feeds it KV events and load,
//! and [`WorkerPool::generate`] (in `generate.rs`) routes a request, sends it
//! over the request plane and streams the worker's outputs back while keeping
//! the router's model of that request up to date.
//!
//! Subjects (component-scoped, reference §4): KV events as `RouterEvent` JSON
//! on `namespace.{ns}.component.{component}.kv-events`; `ActiveLoad` JSON on
//! `namespace.{ns}.kv_metrics`. Undecodable messages are counted
//! (`dynamo_kvrouter_kv_cache_events_rejected`), logged and skipped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use kvrouter_core::protocols::{ActiveLoad, RouterEvent};
use kvrouter_runtime::discovery::DiscoveryEvent;
use kvrouter_runtime::endpoint::{EndpointId, Instance, InstanceId, WorkerMetadata};
use kvrouter_runtime::node::Node;
use kvrouter_runtime::request::RequestError;
use parking_lot::RwLock;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admit::{Admission, Admitted};
use crate::down::DownSet;
use crate::recover::Recovery;
use crate::router::{KvRouter, RouteError};
use crate::sync::ActiveSequenceEvent;

use kvrouter_runtime::subjects::{
    kv_events as kv_events_subject, kv_metrics as kv_metrics_subject,
};

/// Applies every decodable JSON message of `sub` with `apply` until `cancel`;
/// the others are counted (`dynamo_kvrouter_kv_cache_events_rejected{reason}`),
/// logged and skipped — corrupt input never stops the feed.
fn spawn_decoding<T, F>(
    mut sub: kvrouter_runtime::events::Subscription,
    cancel: CancellationToken,
    router: Arc<KvRouter>,
    reason: &'static str,
    apply: F,
) where
    T: serde::de::DeserializeOwned,
    F: Fn(&KvRouter, T) + Send + 'static,
{
    tokio::spawn(async move {
        // One warning per second at most, with the count of those not logged.
        let mut warned: Option<std::time::Instant> = None;
        let mut quiet = 0u64;
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => break,
                m = sub.next() => match m { Some(m) => m, None => break },
            };
            match serde_json::from_slice::<T>(&msg) {
                Ok(v) => apply(&router, v),
                Err(e) => {
                    router
                        .metrics()
                        .events_rejected
                        .with_label_values(&[reason])
                        .inc();
                    if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(error = %e, bytes = msg.len(), reason, not_logged = quiet, "undecodable message skipped");
                        warned = Some(std::time::Instant::now());
                        quiet = 0;
                    } else {
                        quiet += 1;
                    }
                }
            }
        }
    });
}

/// Why a routed call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerateError {
    /// Routing refused it.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The worker failed or could not be reached.
    #[error("worker {worker_id}: {source}")]
    Upstream {
        /// The worker.
        worker_id: InstanceId,
        /// What went wrong.
        #[source]
        source: RequestError,
    },
    /// The worker answered something that is not an engine output.
    #[error("worker {worker_id} sent an invalid response: {message}")]
    Protocol {
        /// The worker.
        worker_id: InstanceId,
        /// The decode error.
        message: String,
    },
}

/// Workers of one endpoint, and the router that picks among them.
pub struct WorkerPool {
    pub(crate) node: Node,
    endpoint: EndpointId,
    pub(crate) router: Arc<KvRouter>,
    /// Live instances with their metadata, parsed once when they appear.
    instances: RwLock<BTreeMap<InstanceId, (Instance, WorkerMetadata)>>,
    count: watch::Sender<usize>,
    /// Workers whose connection failed, out of routing until they answer again.
    pub(crate) down: Arc<DownSet>,
    /// KV events only for workers discovery announced.
    admission: Arc<Admission>,
    /// Event ids followed and gaps repaired (plain event plane only).
    recovery: Option<Arc<Recovery>>,
    /// Times a failed stream may move to another worker (`--migration-limit`).
    migration_limit: std::sync::atomic::AtomicU32,
    /// Streams handed out and not yet dropped.
    pub(crate) in_flight: Arc<std::sync::atomic::AtomicUsize>,
    cancel: CancellationToken,
}

impl WorkerPool {
    /// Subscribes to the endpoint's events and load, then follows its instances.
    pub async fn start(
        node: Node,
        endpoint: EndpointId,
        router: Arc<KvRouter>,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, String> {
        let admission = Arc::new(Admission::default());
        // Durable mode consumes the JetStream stream instead of the plain subject.
        if router.config().use_kv_events && router.config().durable_kv_events {
            let client = node
                .nats
                .clone()
                .ok_or("--durable-kv-events needs NATS (JetStream): use --event-plane nats")?;
            // The backlog replays before the watch reports anyone: admit the
            // workers discovery lists now (the watch announces them again).
            for i in node
                .discovery
                .list(&endpoint)
                .await
                .map_err(|e| e.to_string())?
            {
                admission.announce(i.id);
            }
            let name = format!("router-{}", kvrouter_runtime::node::new_instance_id());
            crate::durable::start(
                client,
                &endpoint,
                router.clone(),
                name,
                cancel.clone(),
                Some(admission.clone()),
            )
            .await
            .map_err(|e| format!("durable KV events: {e}"))?;
        }
        // Subscribe before watching so no event of a new worker is missed.
        let mut events = if router.config().use_kv_events && !router.config().durable_kv_events {
            Some(
                node.events
                    .subscribe(&kv_events_subject(&endpoint))
                    .await
                    .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        let loads = node
            .events
            .subscribe(&kv_metrics_subject(&endpoint.namespace))
            .await
            .map_err(|e| e.to_string())?;
        let mut watch = node
            .discovery
            .watch(&endpoint)
            .await
            .map_err(|e| e.to_string())?;
        let (count, _) = watch::channel(0);
        let recovery = events
            .is_some()
            .then(|| Recovery::new(node.clone(), &endpoint, router.clone(), cancel.clone()));
        let pool = Arc::new(Self {
            node,
            endpoint,
            router,
            instances: RwLock::new(BTreeMap::new()),
            count,
            down: Arc::default(),
            admission,
            recovery,
            migration_limit: Default::default(),
            in_flight: Arc::default(),
            cancel: cancel.clone(),
        });
        pool.down.spawn_prober(cancel.clone());
        if let (Some(events), Some(recovery)) = (events.take(), pool.recovery.clone()) {
            let admission = pool.admission.clone();
            spawn_decoding(
                events,
                cancel.clone(),
                pool.router.clone(),
                "decode",
                move |r, ev: RouterEvent| {
                    let (verdict, expired) = admission.admit(ev);
                    let rejected = expired + usize::from(matches!(verdict, Admitted::Rejected));
                    if rejected > 0 {
                        r.metrics()
                            .events_rejected
                            .with_label_values(&["unknown_worker"])
                            .inc_by(rejected as u64);
                    }
                    if let Admitted::Apply(ev) = verdict {
                        recovery.on_event(ev);
                    }
                },
            );
        }
        spawn_decoding(
            loads,
            cancel.clone(),
            pool.router.clone(),
            "load",
            |r, load: ActiveLoad| r.observe_load(&load),
        );
        if pool.router.config().router_replica_sync {
            pool.start_replica_sync(cancel.clone()).await?;
        }
        let p = pool.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = cancel.cancelled() => break,
                    e = watch.next() => match e { Some(e) => e, None => break },
                };
                p.on_discovery(ev);
            }
        });
        Ok(pool)
    }

    /// Publishes this router's active-sequence changes and applies the other replicas'.
    async fn start_replica_sync(self: &Arc<Self>, cancel: CancellationToken) -> Result<(), String> {
        let subject = kvrouter_runtime::subjects::active_sequences(&self.endpoint);
        let incoming = self
            .node
            .events
            .subscribe(&subject)
            .await
            .map_err(|e| e.to_string())?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ActiveSequenceEvent>();
        self.router
            .enable_replica_sync(kvrouter_runtime::node::new_instance_id(), tx);
        let events = self.node.events.clone();
        let c = cancel.clone();
        let s = subject.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = c.cancelled() => break,
                    e = rx.recv() => match e { Some(e) => e, None => break },
                };
                let bytes = serde_json::to_vec(&ev).expect("sync events serialize");
                if let Err(e) = events.publish(&s, Bytes::from(bytes)).await {
                    tracing::warn!(error = %e, "replica sync event not published");
                }
            }
        });
        spawn_decoding(
            incoming,
            cancel,
            self.router.clone(),
            "active_sequences",
            |r, ev: ActiveSequenceEvent| r.apply_replica_event(&ev),
        );
        Ok(())
    }

    fn on_discovery(&self, ev: DiscoveryEvent) {
        match ev {
            DiscoveryEvent::Added(instance) => {
                match serde_json::from_value::<WorkerMetadata>(instance.metadata.clone()) {
                    Ok(meta) => {
                        if self.router.mode().kv_aware()
                            && meta.block_size as usize != self.router.block_size()
                        {
                            tracing::warn!(
                                worker = instance.id,
                                worker_block_size = meta.block_size,
                                router_block_size = self.router.block_size(),
                                "worker's KV block size differs from the router's: overlaps will be wrong"
                            );
                        }
                        self.router.add_worker(instance.id, &meta);
                        self.down.clear(instance.id);
                        // Before the events that raced the announcement: they
                        // wait for the worker's dump, if it gives one.
                        if let Some(r) = &self.recovery {
                            r.worker_added(instance.id, &meta);
                        }
                        for ev in self.admission.announce(instance.id) {
                            match &self.recovery {
                                Some(r) => r.on_event(ev),
                                None => self.router.apply_event(&ev),
                            }
                        }
                        tracing::info!(worker = instance.id, address = %instance.address, "worker added");
                        self.instances.write().insert(instance.id, (instance, meta));
                    }
                    Err(e) => tracing::warn!(
                        worker = instance.id,
                        error = %e,
                        "instance without valid worker metadata ignored"
                    ),
                }
            }
            DiscoveryEvent::Removed(id) => {
                if let Some((i, _)) = self.instances.write().remove(&id) {
                    self.node.forget(&i.address);
                }
                self.router.remove_worker(id);
                self.down.clear(id);
                self.admission.retire(id);
                if let Some(r) = &self.recovery {
                    r.worker_removed(id);
                }
                tracing::info!(worker = id, "worker removed");
            }
        }
        let n = self.instances.read().len();
        self.count.send_replace(n);
    }

    /// The router.
    pub fn router(&self) -> &Arc<KvRouter> {
        &self.router
    }

    /// The endpoint served by the pool's workers.
    pub fn endpoint(&self) -> &EndpointId {
        &self.endpoint
    }

    /// The OpenAI server of an external engine instance (`kvrouter engine`), if it is one.
    pub fn engine_url(&self, id: InstanceId) -> Option<String> {
        self.instances
            .read()
            .get(&id)
            .and_then(|(i, _)| i.metadata.get("engine_url"))
            .and_then(|u| u.as_str())
            .map(str::to_string)
    }

    /// Lets a stream whose worker fails move to another worker up to `n`
    /// times (0: never).
    pub fn set_migration_limit(&self, n: u32) {
        self.migration_limit
            .store(n, std::sync::atomic::Ordering::Relaxed);
        self.router.metrics().migration_limit.set(i64::from(n));
    }

    /// The migration limit.
    pub fn migration_limit(&self) -> u32 {
        self.migration_limit
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Streams of this pool in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The request-plane address of worker `id`.
    pub(crate) fn address_of(&self, id: InstanceId) -> Option<String> {
        self.instances
            .read()
            .get(&id)
            .map(|(i, _)| i.address.clone())
    }

    /// Whether discovery announced worker `id`.
    pub fn has_worker(&self, id: InstanceId) -> bool {
        self.instances.read().contains_key(&id)
    }

    /// The live instances.
    pub fn instances(&self) -> Vec<Instance> {
        self.instances
            .read()
            .values()
            .map(|(i, _)| i.clone())
            .collect()
    }

    /// What the live workers declared (parsed when each appeared).
    pub fn worker_metadata(&self) -> Vec<WorkerMetadata> {
        self.instances
            .read()
            .values()
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Waits until at least `n` workers are known, or `timeout` passes.
    pub async fn wait_for_workers(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.count.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
