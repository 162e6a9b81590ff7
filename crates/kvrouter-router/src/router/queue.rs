//! The router queue (`--router-queue-threshold`, `--router-queue-policy`):
//! while every rank is saturated, a request waits here for its turn instead of
//! piling onto an engine, and is routed when it gets it, with the load of that
//! moment.
//!
//! Turns are granted one at a time: a released request holds the admission
//! slot until it has been committed (or has given up), so the next release
//! sees its load. Releases are tried whenever load falls (a prefill finishes,
//! a request ends, a worker joins) or a turn ends. A waiting request whose
//! client leaves is dropped from the queue by its guard.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvrouter_core::WorkerKey;
use kvrouter_core::queue::{RouterQueue, Ticket, all_saturated};
use tokio::sync::oneshot;

use super::KvRouter;

/// `max_num_batched_tokens` of a worker that does not declare it (reference §2.6).
const UNKNOWN_BATCHED_TOKENS: u64 = 10_000_000;

pub(super) struct Queue {
    held: RouterQueue<oneshot::Sender<()>>,
    /// A released request that has not been committed yet.
    admitting: bool,
}

impl Queue {
    pub(super) fn new(config: &kvrouter_core::KvRouterConfig) -> Self {
        Self {
            held: RouterQueue::new(config.router_queue_policy, Instant::now()),
            admitting: false,
        }
    }
}

/// A request's turn to be routed; hold it until the request is committed
/// (`begin`), then drop it so the next held request can go.
#[must_use = "the next held request is released when the turn is dropped"]
pub struct Turn {
    router: Option<Arc<KvRouter>>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(r) = self.router.take() {
            r.queue.lock().admitting = false;
            r.release_held();
        }
    }
}

/// Takes a waiting request out of the queue if its future is dropped.
struct Waiting<'a> {
    router: &'a Arc<KvRouter>,
    ticket: Ticket,
    rx: oneshot::Receiver<()>,
    granted: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        let mut q = self.router.queue.lock();
        if q.held.remove(self.ticket) {
            self.router.metrics.queue_depth.set(q.held.len() as i64);
            return;
        }
        // Released while its client left: hand the slot on.
        if self.rx.try_recv().is_ok() {
            q.admitting = false;
            drop(q);
            self.router.release_held();
        }
    }
}

impl KvRouter {
    /// Waits, while every rank is saturated, until this request may be routed
    /// (at once when the queue is off). `jump` moves it earlier under `fcfs`.
    pub async fn turn(self: &Arc<Self>, isl: usize, jump: Duration) -> Turn {
        let Some(threshold) = self.config().router_queue_threshold else {
            return Turn { router: None };
        };
        let rx = {
            let mut q = self.queue.lock();
            if q.held.is_empty() && !q.admitting && !self.saturated(threshold) {
                return Turn { router: None };
            }
            let (tx, rx) = oneshot::channel();
            let ticket = q.held.push(isl, jump, Instant::now(), tx);
            self.metrics.queue_depth.set(q.held.len() as i64);
            (ticket, rx)
        };
        let mut w = Waiting {
            router: self,
            ticket: rx.0,
            rx: rx.1,
            granted: false,
        };
        // The sender lives in the queue until it is used, so this only ends
        // with a grant (the router never drops a held request otherwise).
        let granted = (&mut w.rx).await.is_ok();
        w.granted = granted;
        Turn {
            router: granted.then(|| self.clone()),
        }
    }

    /// Every registered rank above `threshold` × its `max_num_batched_tokens`.
    fn saturated(&self, threshold: f64) -> bool {
        let st = self.state.lock();
        let ranks = st.workers.iter().flat_map(|(&id, m)| {
            // Unknown (0) counts as the reference's 10 M: never saturated.
            let max = match m.max_num_batched_tokens {
                0 => UNKNOWN_BATCHED_TOKENS,
                n => n,
            };
            (0..m.data_parallel_size.max(1)).map(move |r| (WorkerKey::new(id, r), max))
        });
        all_saturated(
            threshold,
            ranks.map(|(w, max)| (st.tracker.get(w).map_or(0, |s| s.active_tokens()), max)),
        )
    }

    /// Releases the next held request if no turn is pending and a rank has room.
    pub(super) fn release_held(&self) {
        let Some(threshold) = self.config().router_queue_threshold else {
            return;
        };
        let mut q = self.queue.lock();
        while !q.admitting && !q.held.is_empty() && !self.saturated(threshold) {
            let Some(tx) = q.held.pop() else { break };
            // A send fails only if the waiter is gone; try the next one.
            if tx.send(()).is_ok() {
                q.admitting = true;
            }
        }
        self.metrics.queue_depth.set(q.held.len() as i64);
    }
}
