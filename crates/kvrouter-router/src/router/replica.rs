//! Replica sync: this router's active-sequence changes go out to the other
//! replicas, and theirs are applied here, so every replica sees the load of
//! requests it did not route.

use std::time::Instant;

use kvrouter_core::WorkerKey;
use kvrouter_core::sequences::NewRequest;

use super::KvRouter;
use crate::sync::{ActiveSequenceEvent, SyncData};

impl KvRouter {
    /// Sends this router's active-sequence changes to `tx`, as router `router_id`.
    pub fn enable_replica_sync(
        &self,
        router_id: u64,
        tx: tokio::sync::mpsc::UnboundedSender<ActiveSequenceEvent>,
    ) {
        *self.sync.write() = Some((router_id, tx));
    }

    pub(super) fn publish(&self, id: &str, w: WorkerKey, data: SyncData) {
        if let Some((router_id, tx)) = self.sync.read().as_ref() {
            let _ = tx.send(ActiveSequenceEvent {
                request_id: id.to_string(),
                worker: w.into(),
                router_id: *router_id,
                lora_name: None,
                data,
            });
        }
    }

    /// Applies another replica's change (own events are ignored).
    pub fn apply_replica_event(&self, ev: &ActiveSequenceEvent) {
        if self
            .sync
            .read()
            .as_ref()
            .is_some_and(|(me, _)| *me == ev.router_id)
        {
            return;
        }
        let w = WorkerKey::new(ev.worker.worker_id, ev.worker.dp_rank);
        let mut st = self.state.lock();
        if !st.workers.contains_key(&w.worker_id) {
            return; // not a worker this replica routes to (yet)
        }
        let result = match &ev.data {
            SyncData::AddRequest(a) => st.tracker.add_request(
                w,
                NewRequest {
                    id: &ev.request_id,
                    seq_hashes: a.token_sequence.as_deref(),
                    isl: a.isl,
                    overlap: a.overlap,
                    expected_output_tokens: a.expected_output_tokens,
                },
                Instant::now(),
            ),
            SyncData::MarkPrefillCompleted => st.tracker.mark_prefill_completed(&ev.request_id),
            SyncData::Free => st.tracker.free(&ev.request_id),
        };
        if let Err(e) = result {
            tracing::debug!(request_id = %ev.request_id, error = %e, "replica event not applied");
        }
        self.observe_rank(&mut st, w);
        drop(st);
        self.release_held();
    }
}
