//! The router queue's pure parts: when every worker is saturated, and the
//! order in which held requests are released.
//!
//! A queue with threshold θ holds requests while **every** rank has more than
//! θ · `max_num_batched_tokens` prefill tokens in flight (reference §2.6):
//! sending more would only lengthen engine queues, while waiting in the router
//! lets the decision use fresher load and cache state. It never rejects.
//! Release order is `fcfs` (arrival, moved earlier by the request's
//! `latency_sensitivity` in seconds) or `wspt` (Smith's rule with unit weights:
//! the shortest prompt first, which lowers mean TTFT at some cost to the tail).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::selection::{choice_name, parse_choice};

/// The order in which held requests are released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum QueuePolicy {
    /// First come, first served (with priority jumps).
    #[default]
    Fcfs,
    /// Weighted shortest processing time: shortest prompt first.
    Wspt,
}

impl QueuePolicy {
    /// Every policy, by name.
    pub const ALL: [(QueuePolicy, &'static str); 2] =
        [(QueuePolicy::Fcfs, "fcfs"), (QueuePolicy::Wspt, "wspt")];
}

impl fmt::Display for QueuePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(choice_name(self, &Self::ALL))
    }
}

impl FromStr for QueuePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_choice(s, &Self::ALL, "router queue policy")
    }
}

/// Whether every rank is saturated: `active_tokens > θ · max_batched` for
/// each `(active_tokens, max_batched)`. No ranks is not saturated (routing
/// then fails on its own, with its own error).
pub fn all_saturated(threshold: f64, ranks: impl IntoIterator<Item = (usize, u64)>) -> bool {
    let mut any = false;
    for (active, max_batched) in ranks {
        any = true;
        if active as f64 <= threshold * max_batched as f64 {
            return false;
        }
    }
    any
}

/// A request's priority jump from its `latency_sensitivity` agent hint
/// (seconds; anything not a finite non-negative number counts as none).
pub fn priority_jump(latency_sensitivity: Option<&serde_json::Value>) -> Duration {
    latency_sensitivity
        .and_then(serde_json::Value::as_f64)
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(Duration::ZERO, |s| Duration::from_secs_f64(s.min(86_400.0)))
}

/// Held requests in release order; `T` is what wakes one.
#[derive(Debug)]
pub struct RouterQueue<T> {
    policy: QueuePolicy,
    start: Instant,
    next: u64,
    held: BTreeMap<(u64, u64), T>,
}

/// A held request's place, to take it out if its client leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket((u64, u64));

impl<T> RouterQueue<T> {
    /// An empty queue; `start` anchors arrival offsets.
    pub fn new(policy: QueuePolicy, start: Instant) -> Self {
        Self {
            policy,
            start,
            next: 0,
            held: BTreeMap::new(),
        }
    }

    /// Holds a request of `isl` prompt tokens that arrived `now`, moved
    /// `jump` earlier under `fcfs`.
    pub fn push(&mut self, isl: usize, jump: Duration, now: Instant, waker: T) -> Ticket {
        let rank = match self.policy {
            QueuePolicy::Fcfs => {
                let offset = now.saturating_duration_since(self.start);
                offset.saturating_sub(jump).as_micros() as u64
            }
            QueuePolicy::Wspt => isl as u64,
        };
        self.next += 1;
        let key = (rank, self.next);
        self.held.insert(key, waker);
        Ticket(key)
    }

    /// The next request to release.
    pub fn pop(&mut self) -> Option<T> {
        self.held.pop_first().map(|(_, t)| t)
    }

    /// Takes a request out (its client left); `false` if it was released already.
    pub fn remove(&mut self, ticket: Ticket) -> bool {
        self.held.remove(&ticket.0).is_some()
    }

    /// Requests held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_jump_reads_seconds_and_ignores_nonsense() {
        use serde_json::json;
        assert_eq!(
            priority_jump(Some(&json!(1.5))),
            Duration::from_millis(1500)
        );
        assert_eq!(priority_jump(Some(&json!(-2))), Duration::ZERO);
        assert_eq!(priority_jump(Some(&json!("fast"))), Duration::ZERO);
        assert_eq!(priority_jump(None), Duration::ZERO);
    }

    #[test]
    fn saturation_needs_every_rank_over_the_threshold() {
        assert!(!all_saturated(1.0, []));
        assert!(all_saturated(1.0, [(11, 10), (20, 10)]));
        assert!(!all_saturated(1.0, [(11, 10), (10, 10)]));
        assert!(!all_saturated(2.0, [(11, 10), (20, 10)]));
        assert!(all_saturated(0.0, [(1, 10)]));
        assert!(!all_saturated(0.0, [(0, 10)]));
    }

    #[test]
    fn fcfs_releases_in_arrival_order_with_jumps_and_removal() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut q = RouterQueue::new(QueuePolicy::Fcfs, t0);
        q.push(100, Duration::ZERO, at(10), "a");
        let b = q.push(5, Duration::ZERO, at(20), "b");
        q.push(50, Duration::ZERO, at(30), "c");
        // Arrived at 40 ms but 25 ms sensitive: ranks as if it came at 15 ms.
        q.push(50, Duration::from_millis(25), at(40), "d");
        assert_eq!(q.len(), 4);
        assert!(q.remove(b));
        assert!(!q.remove(b));
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, ["a", "d", "c"]);
        assert!(q.is_empty());
    }

    #[test]
    fn wspt_releases_the_shortest_prompt_first_ties_by_arrival() {
        let t0 = Instant::now();
        let mut q = RouterQueue::new(QueuePolicy::Wspt, t0);
        for (isl, name) in [(300, "long"), (20, "short"), (90, "mid"), (20, "short2")] {
            q.push(isl, Duration::ZERO, t0, name);
        }
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, ["short", "short2", "mid", "long"]);
        assert_eq!("wspt".parse::<QueuePolicy>(), Ok(QueuePolicy::Wspt));
        assert!("lifo".parse::<QueuePolicy>().is_err());
    }
}
