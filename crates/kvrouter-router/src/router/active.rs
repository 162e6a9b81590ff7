//! The guard of one routed request: it follows the request's stream (prefill
//! done at the first token, an output block per `block_size` tokens) and frees
//! the request when dropped — at the end, on an error or when the client goes
//! away — publishing each change to replicas.

use std::sync::Arc;

use kvrouter_core::WorkerKey;
use rand::RngExt;

use super::KvRouter;
use crate::sync::SyncData;

/// A routed request being tracked; dropping it frees the request.
pub struct ActiveRequest {
    router: Arc<KvRouter>,
    id: String,
    worker: WorkerKey,
    isl: usize,
    prefill_done: bool,
    generated: u32,
    tracked: bool,
}

impl ActiveRequest {
    pub(super) fn new(
        router: Arc<KvRouter>,
        id: String,
        worker: WorkerKey,
        isl: usize,
        tracked: bool,
    ) -> Self {
        Self {
            router,
            id,
            worker,
            isl,
            prefill_done: false,
            generated: 0,
            tracked,
        }
    }

    /// Where the request went.
    pub fn worker(&self) -> WorkerKey {
        self.worker
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Records `n` newly generated tokens (the first marks prefill done).
    pub fn on_tokens(&mut self, n: usize) {
        if !self.tracked {
            return;
        }
        if !self.prefill_done {
            self.prefill_done = true;
            self.router.mark_prefill(&self.id, self.worker);
        }
        if n == 0 || !self.router.config().router_track_output_blocks {
            self.generated = self.generated.saturating_add(n as u32);
            return;
        }
        let bs = self.router.block_size();
        let before = (self.isl + self.generated as usize).div_ceil(bs);
        self.generated = self.generated.saturating_add(n as u32);
        let after = (self.isl + self.generated as usize).div_ceil(bs);
        for _ in before..after {
            let expected = self
                .router
                .state
                .lock()
                .tracker
                .get(self.worker)
                .and_then(|s| s.expected_output_tokens(&self.id));
            let decay =
                kvrouter_core::sequences::ActiveSequences::output_decay(self.generated, expected);
            self.router.output_block(&self.id, self.worker, decay);
        }
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        if self.tracked {
            self.router.free(&self.id, self.worker);
        }
    }
}

impl KvRouter {
    fn mark_prefill(&self, id: &str, w: WorkerKey) {
        self.load_fell(id, w, false);
    }

    fn output_block(&self, id: &str, w: WorkerKey, decay: Option<f64>) {
        let mut st = self.state.lock();
        let h: u64 = st.rng.random();
        if st.tracker.add_output_block(id, h, decay).is_ok() {
            self.observe_rank(&mut st, w);
        }
    }

    fn free(&self, id: &str, w: WorkerKey) {
        self.load_fell(id, w, true);
    }

    /// A request's prefill finished (or, `ended`, the request did): track it,
    /// tell the replicas, and let the router queue release a held request.
    fn load_fell(&self, id: &str, w: WorkerKey, ended: bool) {
        let mut st = self.state.lock();
        let (applied, change) = if ended {
            (st.tracker.free(id), SyncData::Free)
        } else {
            (
                st.tracker.mark_prefill_completed(id),
                SyncData::MarkPrefillCompleted,
            )
        };
        if applied.is_ok() {
            self.observe_rank(&mut st, w);
        }
        drop(st);
        self.publish(id, w, change);
        self.release_held();
    }
}
