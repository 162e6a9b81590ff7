//! Worker-query recovery (reference §7.2): lost KV events are asked for again.
//!
//! Without a durable stream, an event lost in transit (a NATS outage, a router
//! that was down) would leave the index wrong until the blocks happen to be
//! stored or removed again. So each worker rank keeps a [`LocalLog`] of its own
//! events — the blocks it holds now and its last [`LOG_EVENTS`] events — and
//! answers a [`KvQuery`] with the events from a given id on, or with a dump of
//! its blocks when those are no longer in the log. On the router, a
//! [`Follower`] tracks each (worker, rank)'s event ids: a gap starts a query,
//! live events are held until the answer arrives, and then the answer and the
//! held events are applied in order, so the index ends as if nothing had been
//! lost. A worker the router has just discovered is rebuilt the same way, from
//! a dump, which is how a restarted router gets back what it knew.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::UpstreamError;
use crate::hash::ExternalSequenceBlockHash;
use crate::protocols::{
    DpRank, KvCacheEvent, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData, RouterEvent,
    WorkerId, WorkerKey,
};

/// Events a worker rank keeps for queries (the reference's buffer size).
pub const LOG_EVENTS: usize = 1024;
/// Live events a router holds per rank while it recovers; more are dropped,
/// which shows up as a new gap once the recovery ends.
pub const HOLD_EVENTS: usize = 65_536;

/// A router's question to a worker about one of its ranks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvQuery {
    /// The rank.
    #[serde(default)]
    pub dp_rank: DpRank,
    /// The first event wanted; `None` asks for a dump of the rank's blocks.
    #[serde(default)]
    pub start_event_id: Option<u64>,
}

/// A worker's answer to a [`KvQuery`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvQueryReply {
    /// Every event from the requested id to the newest, with their ids.
    Events {
        /// In order.
        events: Vec<RouterEvent>,
    },
    /// The rank's blocks now, as stored events: what a fresh index needs.
    Dump {
        /// The newest event these blocks include (`None`: no event yet).
        last_event_id: Option<u64>,
        /// Parents before children.
        events: Vec<RouterEvent>,
    },
}

/// A worker's side of the query: `request` is `KvQuery` JSON, `answer` gives
/// the reply of one rank (`None`: no such rank); the reply comes back as JSON.
pub fn answer_query(
    request: &[u8],
    answer: impl FnOnce(DpRank, Option<u64>) -> Option<KvQueryReply>,
) -> Result<Vec<u8>, UpstreamError> {
    let q: KvQuery = serde_json::from_slice(request)
        .map_err(|e| UpstreamError::invalid(format!("invalid KV query: {e}")))?;
    let reply = answer(q.dp_rank, q.start_event_id)
        .ok_or_else(|| UpstreamError::invalid(format!("no rank {} here", q.dp_rank)))?;
    Ok(serde_json::to_vec(&reply).expect("replies serialize"))
}

/// One worker rank's own KV events: its blocks and its recent history.
#[derive(Debug, Clone)]
pub struct LocalLog {
    key: WorkerKey,
    recent: VecDeque<KvCacheEvent>,
    /// Engine hash → (parent's engine hash, the block).
    blocks: HashMap<u64, (Option<u64>, KvCacheStoredBlockData)>,
    last: Option<u64>,
}

impl LocalLog {
    /// An empty log for `worker_id`'s rank `dp_rank`.
    pub fn new(worker_id: WorkerId, dp_rank: DpRank) -> Self {
        Self {
            key: WorkerKey::new(worker_id, dp_rank),
            recent: VecDeque::with_capacity(LOG_EVENTS),
            blocks: HashMap::new(),
            last: None,
        }
    }

    /// Records an event the rank is about to publish.
    pub fn record(&mut self, ev: &KvCacheEvent) {
        match &ev.data {
            KvCacheEventData::Stored(s) => {
                let mut parent = s.parent_hash.map(|h| h.0);
                for b in &s.blocks {
                    self.blocks.insert(b.block_hash.0, (parent, b.clone()));
                    parent = Some(b.block_hash.0);
                }
            }
            KvCacheEventData::Removed(r) => {
                for h in &r.block_hashes {
                    self.blocks.remove(&h.0);
                }
            }
            KvCacheEventData::Cleared => self.blocks.clear(),
        }
        if self.recent.len() == LOG_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(ev.clone());
        self.last = Some(ev.event_id);
    }

    /// The newest event recorded.
    pub fn last_event_id(&self) -> Option<u64> {
        self.last
    }

    /// Blocks held now.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the rank holds no block.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The events from `start` on if the log still has them all, else a dump.
    pub fn answer(&self, start: Option<u64>) -> KvQueryReply {
        if let Some(start) = start {
            let newest = self.last.map_or(0, |l| l + 1);
            let oldest = self.recent.front().map_or(newest, |e| e.event_id);
            if start >= oldest && start <= newest {
                let events = self
                    .recent
                    .iter()
                    .filter(|e| e.event_id >= start)
                    .map(|e| self.wrap(e.clone()))
                    .collect();
                return KvQueryReply::Events { events };
            }
        }
        KvQueryReply::Dump {
            last_event_id: self.last,
            events: self.dump(),
        }
    }

    /// The blocks as stored events, each chain from the root with parents
    /// first. Blocks whose parent is gone are left out: no lookup from the
    /// root can reach them, so a fresh index would not count them either.
    pub fn dump(&self) -> Vec<RouterEvent> {
        let mut children: BTreeMap<Option<u64>, Vec<u64>> = BTreeMap::new();
        for (&h, &(parent, _)) in &self.blocks {
            let parent = parent.filter(|p| self.blocks.contains_key(p));
            if parent.is_none() && self.blocks[&h].0.is_some() {
                continue; // orphan
            }
            children.entry(parent).or_default().push(h);
        }
        for c in children.values_mut() {
            c.sort_unstable();
        }
        let id = self.last.unwrap_or(0);
        let mut out = Vec::new();
        let mut starts: Vec<(Option<u64>, u64)> = children
            .get(&None)
            .map(|r| r.iter().rev().map(|&h| (None, h)).collect())
            .unwrap_or_default();
        let mut seen = HashSet::new();
        while let Some((parent, first)) = starts.pop() {
            // Follow the chain while it does not branch: one event per chain.
            let mut chain = Vec::new();
            let mut at = first;
            loop {
                if !seen.insert(at) {
                    break; // a cycle in forged input
                }
                chain.push(self.blocks[&at].1.clone());
                match children.get(&Some(at)).map(Vec::as_slice) {
                    Some([only]) => at = *only,
                    Some(many) => {
                        starts.extend(many.iter().rev().map(|&c| (Some(at), c)));
                        break;
                    }
                    None => break,
                }
            }
            out.push(self.wrap(KvCacheEvent {
                event_id: id,
                data: KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: parent.map(ExternalSequenceBlockHash),
                    blocks: chain,
                }),
                dp_rank: self.key.dp_rank,
            }));
        }
        out
    }

    fn wrap(&self, event: KvCacheEvent) -> RouterEvent {
        RouterEvent::new(self.key.worker_id, event)
    }
}

/// What the router does with one live event.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Apply it now.
    Apply(RouterEvent),
    /// It is held (a recovery of its rank is under way).
    Held,
    /// Held too, and a recovery must start: ask the worker for `start` on.
    Recover {
        /// The rank.
        key: WorkerKey,
        /// The first missing id (`None`: ask for a dump).
        start: Option<u64>,
        /// How many ids were skipped.
        missing: u64,
    },
    /// Older than what was applied: dropped.
    Stale,
    /// Held events overflowed [`HOLD_EVENTS`]: dropped (a later gap repairs it).
    Overflow,
    /// A gap that cannot be repaired (the worker cannot be asked, or just
    /// answered without these ids): applied anyway, counted.
    Unrepairable(RouterEvent, u64),
}

/// What to apply once a recovery ends.
#[derive(Debug, Default, PartialEq)]
pub struct Resolution {
    /// Forget the rank's blocks first (the answer was a dump).
    pub reset: bool,
    /// Events to apply, in order.
    pub apply: Vec<RouterEvent>,
    /// The answer did not fit the question: start this recovery (a dump).
    pub again: Option<Step>,
    /// Ids skipped among the held events that the answer did not explain.
    pub unrepaired: u64,
}

#[derive(Debug)]
enum Follow {
    /// `expect`: the next id (`None`: any, nothing known yet).
    Live { expect: Option<u64> },
    Recovering {
        start: Option<u64>,
        held: VecDeque<RouterEvent>,
    },
}

/// The router's view of each rank's event ids.
#[derive(Debug, Default)]
pub struct Follower {
    ranks: HashMap<WorkerKey, Follow>,
    /// Workers that answer queries.
    queryable: HashSet<WorkerId>,
}

impl Follower {
    /// A worker appeared. If it answers queries, each of its ranks starts in
    /// recovery from a dump (returned: one query per rank to send).
    pub fn add_worker(&mut self, id: WorkerId, ranks: u32, queryable: bool) -> Vec<Step> {
        self.forget_worker(id);
        if !queryable {
            return Vec::new();
        }
        self.queryable.insert(id);
        (0..ranks.max(1))
            .map(|r| {
                let key = WorkerKey::new(id, r);
                self.ranks.insert(
                    key,
                    Follow::Recovering {
                        start: None,
                        held: VecDeque::new(),
                    },
                );
                Step::Recover {
                    key,
                    start: None,
                    missing: 0,
                }
            })
            .collect()
    }

    /// A worker left.
    pub fn forget_worker(&mut self, id: WorkerId) {
        self.queryable.remove(&id);
        self.ranks.retain(|k, _| k.worker_id != id);
    }

    /// Whether a recovery of `key` is under way.
    pub fn recovering(&self, key: WorkerKey) -> bool {
        matches!(self.ranks.get(&key), Some(Follow::Recovering { .. }))
    }

    /// Decides a live event.
    pub fn on_event(&mut self, ev: RouterEvent) -> Step {
        self.decide(ev, true)
    }

    /// `repair`: whether a gap may start a recovery. Events held through one
    /// are decided without: a gap among them right after the worker answered
    /// means ids the worker never published (forged, or from an earlier life
    /// of the worker), and asking again would loop.
    fn decide(&mut self, ev: RouterEvent, repair: bool) -> Step {
        let key = ev.worker_key();
        let id = ev.event.event_id;
        let queryable = self.queryable.contains(&key.worker_id);
        let follow = self
            .ranks
            .entry(key)
            .or_insert(Follow::Live { expect: None });
        match follow {
            Follow::Recovering { held, .. } => {
                if held.len() >= HOLD_EVENTS {
                    return Step::Overflow;
                }
                held.push_back(ev);
                Step::Held
            }
            Follow::Live { expect } => match *expect {
                // A publisher that starts again numbers from 0.
                Some(e) if id + 1 < e && id != 0 => Step::Stale,
                Some(e) if id > e => {
                    let missing = id - e;
                    if !queryable || !repair {
                        *expect = Some(id + 1);
                        return Step::Unrepairable(ev, missing);
                    }
                    *follow = Follow::Recovering {
                        start: Some(e),
                        held: VecDeque::from([ev]),
                    };
                    Step::Recover {
                        key,
                        start: Some(e),
                        missing,
                    }
                }
                _ => {
                    // Ids repeat within a batch (vLLM numbers batches, not events).
                    *expect = Some(if id == 0 {
                        1
                    } else {
                        expect.map_or(id + 1, |e| e.max(id + 1))
                    });
                    Step::Apply(ev)
                }
            },
        }
    }

    /// The worker answered (`Some`) or could not (`None`) for `key`.
    pub fn finish(&mut self, key: WorkerKey, reply: Option<KvQueryReply>) -> Resolution {
        let Some(Follow::Recovering { start, held }) = self.ranks.remove(&key) else {
            return Resolution::default();
        };
        let mut out = Resolution::default();
        let expect = match reply {
            Some(KvQueryReply::Events { events }) if contiguous(&events, start) => {
                let expect = events.last().map(|e| e.event.event_id + 1).or(start);
                out.apply = events;
                expect
            }
            Some(KvQueryReply::Events { .. }) => {
                // Not what was asked: start over from a dump.
                self.ranks
                    .insert(key, Follow::Recovering { start: None, held });
                out.again = Some(Step::Recover {
                    key,
                    start: None,
                    missing: 0,
                });
                return out;
            }
            Some(KvQueryReply::Dump {
                last_event_id,
                events,
            }) => {
                out.reset = true;
                out.apply = events;
                Some(last_event_id.map_or(0, |l| l + 1))
            }
            // The worker could not say: apply what was held, as if there were no gap.
            None => {
                let expect = held.back().map(|e| e.event.event_id + 1);
                out.apply.extend(held);
                self.ranks.insert(key, Follow::Live { expect });
                return out;
            }
        };
        self.ranks.insert(key, Follow::Live { expect });
        for ev in held {
            if expect.is_some_and(|e| ev.event.event_id < e) {
                continue; // already in the answer
            }
            match self.decide(ev, false) {
                Step::Apply(e) => out.apply.push(e),
                Step::Unrepairable(e, missing) => {
                    out.unrepaired += missing;
                    out.apply.push(e);
                }
                Step::Recover { .. } | Step::Held | Step::Stale | Step::Overflow => {}
            }
        }
        out
    }
}

/// Whether `events` are the ids `start, start+1, …` (repeats allowed).
fn contiguous(events: &[RouterEvent], start: Option<u64>) -> bool {
    let Some(mut expect) = start else {
        return false;
    };
    for e in events {
        let id = e.event.event_id;
        if id == expect {
            expect += 1;
        } else if id + 1 != expect {
            return false;
        }
    }
    true
}

#[cfg(test)]
#[path = "recovery_tests.rs"]
mod tests;
