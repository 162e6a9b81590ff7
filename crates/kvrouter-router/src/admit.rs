//! KV events are admitted only for workers discovery announced. Anyone who
//! can publish on the event plane could otherwise fill the index with blocks
//! of workers that do not exist. An event may race its worker's announcement
//! (the worker publishes as soon as it starts, discovery reaches the router a
//! moment later), so events of an unknown worker are held for [`GRACE`] —
//! at most [`HOLD_PER_WORKER`] of them, for at most [`HOLD_WORKERS`] unknown
//! workers — and applied if the worker is announced in time; otherwise they
//! are dropped and counted (`dynamo_kvrouter_kv_cache_events_rejected{reason="unknown_worker"}`).
//!
//! In durable mode the router lists discovery before it replays the
//! snapshot and the stream, so the backlog of workers that are still there is
//! admitted and that of workers that left is not.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use kvrouter_core::protocols::RouterEvent;
use kvrouter_runtime::endpoint::InstanceId;
use parking_lot::Mutex;

/// How long events of an unannounced worker wait for its announcement.
pub const GRACE: Duration = Duration::from_secs(5);
/// Events held per unannounced worker; more are rejected at once.
pub const HOLD_PER_WORKER: usize = 4096;
/// Unannounced workers whose events are held; events of more are rejected at once.
pub const HOLD_WORKERS: usize = 64;

/// What became of an event.
#[derive(Debug)]
pub enum Admitted {
    /// Its worker is known: apply it.
    Apply(RouterEvent),
    /// Held for its worker's announcement.
    Held,
    /// Rejected.
    Rejected,
}

struct Waiting {
    since: Instant,
    events: Vec<RouterEvent>,
}

#[derive(Default)]
struct State {
    known: HashSet<InstanceId>,
    waiting: HashMap<InstanceId, Waiting>,
}

/// The gate between the event plane and the index.
#[derive(Default)]
pub struct Admission {
    state: Mutex<State>,
}

impl Admission {
    /// Applies `ev` through the gate to `router`, counting what it rejects.
    pub fn admit_into(&self, router: &crate::KvRouter, ev: RouterEvent) {
        let (verdict, expired) = self.admit(ev);
        let rejected = expired + usize::from(matches!(verdict, Admitted::Rejected));
        if rejected > 0 {
            router
                .metrics()
                .events_rejected
                .with_label_values(&["unknown_worker"])
                .inc_by(rejected as u64);
        }
        if let Admitted::Apply(ev) = verdict {
            router.apply_event(&ev);
        }
    }

    /// Decides `ev`; also returns how many held events expired (to be counted as rejected).
    pub fn admit(&self, ev: RouterEvent) -> (Admitted, usize) {
        let now = Instant::now();
        let mut st = self.state.lock();
        let expired = expire(&mut st, now);
        if st.known.contains(&ev.worker_id) {
            return (Admitted::Apply(ev), expired);
        }
        let room = st.waiting.len() < HOLD_WORKERS || st.waiting.contains_key(&ev.worker_id);
        if !room {
            return (Admitted::Rejected, expired);
        }
        let w = st.waiting.entry(ev.worker_id).or_insert_with(|| Waiting {
            since: now,
            events: Vec::new(),
        });
        if w.events.len() >= HOLD_PER_WORKER {
            return (Admitted::Rejected, expired);
        }
        w.events.push(ev);
        (Admitted::Held, expired)
    }

    /// Discovery announced `id`: its held events, in arrival order, to apply now.
    pub fn announce(&self, id: InstanceId) -> Vec<RouterEvent> {
        let mut st = self.state.lock();
        st.known.insert(id);
        st.waiting.remove(&id).map(|w| w.events).unwrap_or_default()
    }

    /// Discovery removed `id`: its later events are held and then rejected.
    pub fn retire(&self, id: InstanceId) {
        self.state.lock().known.remove(&id);
    }
}

/// Drops the held events whose grace is over; returns how many.
fn expire(st: &mut State, now: Instant) -> usize {
    let mut dropped = 0;
    st.waiting.retain(|id, w| {
        let keep = now.duration_since(w.since) < GRACE;
        if !keep {
            dropped += w.events.len();
            tracing::warn!(
                worker = id,
                events = w.events.len(),
                "KV events of a worker discovery never announced were dropped"
            );
        }
        keep
    });
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter_core::protocols::{KvCacheEvent, KvCacheEventData};

    fn ev(worker: u64, id: u64) -> RouterEvent {
        RouterEvent::new(
            worker,
            KvCacheEvent {
                event_id: id,
                data: KvCacheEventData::Cleared,
                dp_rank: 0,
            },
        )
    }

    #[test]
    fn events_wait_for_their_worker_and_are_bounded() {
        let a = Admission::default();
        assert!(matches!(a.admit(ev(1, 0)).0, Admitted::Held));
        assert!(matches!(a.admit(ev(1, 1)).0, Admitted::Held));
        let held = a.announce(1);
        assert_eq!(
            held.iter().map(|e| e.event.event_id).collect::<Vec<_>>(),
            [0, 1]
        );
        assert!(matches!(a.admit(ev(1, 2)).0, Admitted::Apply(_)));
        // Too many events of one unknown worker, too many unknown workers.
        for i in 0..HOLD_PER_WORKER as u64 {
            assert!(matches!(a.admit(ev(2, i)).0, Admitted::Held));
        }
        assert!(matches!(a.admit(ev(2, 0)).0, Admitted::Rejected));
        for w in 3..(2 + HOLD_WORKERS as u64) {
            assert!(matches!(a.admit(ev(w, 0)).0, Admitted::Held));
        }
        assert!(matches!(a.admit(ev(999, 0)).0, Admitted::Rejected));
        // A removed worker is no longer known.
        a.retire(1);
        assert!(matches!(a.admit(ev(1, 3)).0, Admitted::Rejected));
    }
}
