//! Lost KV events repaired by asking the worker (reference §7.2).
//!
//! Between the event plane and the index sits a [`Follower`]: it knows each
//! (worker, rank)'s next event id. A gap — events lost in a NATS outage, or a
//! router that subscribed late — is counted
//! (`kvrouter_kv_event_gaps_total`, `kvrouter_kv_events_missed_total`) and
//! repaired: the worker's `worker_kv_indexer_query` endpoint is asked for the
//! events from the gap on (or, when its log no longer has them, a dump of the
//! rank's blocks), live events of that rank are held meanwhile, and then the
//! answer and the held events are applied in order
//! (`kvrouter_kv_recoveries_total{result}`). A newly discovered worker is
//! rebuilt from a dump the same way, which is how a router that restarts
//! without JetStream answers as it did before. Workers that do not answer
//! queries (external engines, whose events have their own replay) are only
//! counted. Durable mode (JetStream) does not need any of this.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvrouter_core::protocols::{RouterEvent, WorkerKey};
use kvrouter_core::recovery::{Follower, KvQuery, KvQueryReply, Step};
use kvrouter_runtime::endpoint::{EndpointId, InstanceId, WorkerMetadata};
use kvrouter_runtime::node::Node;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::router::KvRouter;

/// How long a worker has to answer a recovery query.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The event follower of one worker pool.
pub(crate) struct Recovery {
    node: Node,
    query_endpoint: EndpointId,
    router: Arc<KvRouter>,
    follower: Mutex<Follower>,
    cancel: CancellationToken,
    /// Gap warnings: at most one a second, with the count of those not logged.
    warned: Mutex<(Option<Instant>, u64)>,
}

impl Recovery {
    pub(crate) fn new(
        node: Node,
        endpoint: &EndpointId,
        router: Arc<KvRouter>,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            query_endpoint: kvrouter_runtime::subjects::kv_query_endpoint(endpoint),
            router,
            follower: Mutex::default(),
            cancel,
            warned: Mutex::default(),
        })
    }

    /// A live, admitted event.
    pub(crate) fn on_event(self: &Arc<Self>, ev: RouterEvent) {
        // Applied under the follower's lock, so a recovery's answer and the
        // live events of its rank reach the index in id order.
        let mut f = self.follower.lock();
        let step = f.on_event(ev);
        self.act(step);
    }

    /// Discovery announced a worker: its ranks are rebuilt from dumps if it answers queries.
    pub(crate) fn worker_added(self: &Arc<Self>, id: InstanceId, meta: &WorkerMetadata) {
        let mut f = self.follower.lock();
        for step in f.add_worker(id, meta.data_parallel_size, meta.enable_local_indexer) {
            self.act(step);
        }
    }

    /// Discovery removed a worker.
    pub(crate) fn worker_removed(&self, id: InstanceId) {
        self.follower.lock().forget_worker(id);
    }

    fn act(self: &Arc<Self>, step: Step) {
        let m = self.router.metrics();
        match step {
            Step::Apply(ev) => self.router.apply_event(&ev),
            Step::Held => {}
            Step::Recover {
                key,
                start,
                missing,
            } => {
                if start.is_some() {
                    m.event_gaps.inc();
                    m.events_missed.inc_by(missing);
                    self.warn_gap(key, missing, true);
                }
                self.spawn_query(key, start);
            }
            Step::Unrepairable(ev, missing) => {
                m.event_gaps.inc();
                m.events_missed.inc_by(missing);
                self.warn_gap(ev.worker_key(), missing, false);
                self.router.apply_event(&ev);
            }
            Step::Stale => m.events_rejected.with_label_values(&["stale"]).inc(),
            Step::Overflow => m
                .events_rejected
                .with_label_values(&["recovery_overflow"])
                .inc(),
        }
    }

    fn warn_gap(&self, key: WorkerKey, missing: u64, repairing: bool) {
        let mut w = self.warned.lock();
        if w.0.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            tracing::warn!(
                worker = key.worker_id,
                dp_rank = key.dp_rank,
                missing,
                repairing,
                not_logged = w.1,
                "KV events lost in transit"
            );
            *w = (Some(Instant::now()), 0);
        } else {
            w.1 += 1;
        }
    }

    fn spawn_query(self: &Arc<Self>, key: WorkerKey, start: Option<u64>) {
        let me = self.clone();
        tokio::spawn(async move {
            let answer = tokio::select! {
                _ = me.cancel.cancelled() => return,
                a = tokio::time::timeout(QUERY_TIMEOUT, me.ask(key, start)) => a,
            };
            let reply = match answer {
                Ok(Ok(r)) => Some(r),
                Ok(Err(e)) => {
                    tracing::warn!(worker = key.worker_id, dp_rank = key.dp_rank, error = %e, "KV recovery query failed; applying the events held");
                    None
                }
                Err(_) => {
                    tracing::warn!(
                        worker = key.worker_id,
                        dp_rank = key.dp_rank,
                        "KV recovery query timed out; applying the events held"
                    );
                    None
                }
            };
            me.finish(key, reply);
        });
    }

    async fn ask(&self, key: WorkerKey, start: Option<u64>) -> Result<KvQueryReply, String> {
        let instances = self
            .node
            .discovery
            .list(&self.query_endpoint)
            .await
            .map_err(|e| e.to_string())?;
        let at = instances
            .iter()
            .find(|i| i.id == key.worker_id)
            .ok_or("the worker serves no KV query endpoint")?;
        let query = KvQuery {
            dp_rank: key.dp_rank,
            start_event_id: start,
        };
        let body = Bytes::from(serde_json::to_vec(&query).expect("queries serialize"));
        let result = async {
            let mut responses = self.node.call(&at.address, body).await?;
            responses
                .next()
                .await
                .unwrap_or(Err(kvrouter_runtime::request::RequestError::ConnectionLost))
        }
        .await;
        // Queries are rare: keep no connection open for them.
        self.node.forget(&at.address);
        let bytes = result.map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| format!("invalid KV query answer: {e}"))
    }

    fn finish(self: &Arc<Self>, key: WorkerKey, reply: Option<KvQueryReply>) {
        let mut f = self.follower.lock();
        if !f.recovering(key) {
            return; // the worker left meanwhile
        }
        let result = match &reply {
            Some(KvQueryReply::Events { .. }) => "events",
            Some(KvQueryReply::Dump { .. }) => "dump",
            None => "failed",
        };
        self.router
            .metrics()
            .recoveries
            .with_label_values(&[result])
            .inc();
        let r = f.finish(key, reply);
        if r.unrepaired > 0 {
            self.router.metrics().events_missed.inc_by(r.unrepaired);
            self.warn_gap(key, r.unrepaired, false);
        }
        if r.reset {
            self.router.reset_rank(key);
        }
        for ev in &r.apply {
            self.router.apply_event(ev);
        }
        if let Some(step) = r.again {
            self.act(step);
        }
    }
}
