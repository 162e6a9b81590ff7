//! The exact, event-driven prefix index over every worker's cached blocks.
//!
//! Layout: one arena of nodes and one open-addressed table of edges. A node is
//! the block at the end of one path from the root; it records its parent, its
//! edge key (the [`LocalBlockHash`]), an engine hash, how many children it has
//! and which workers cache it. The edge table stores only 4-byte node ids,
//! keyed by `(parent id, local hash)` and compared against the node itself, so
//! a step down the tree is one probe into a dense table plus one node read,
//! and no node owns a map of its children. Per worker, a map from the engine's
//! block hash to the node serves removals and parent look-ups.
//!
//! Invariants, checked by the property tests: a worker appears on a node
//! exactly as often as its map points there; a node lives while it has a
//! worker or a child, and is freed (with its now-empty ancestors) otherwise;
//! an event is validated before it mutates anything, so a rejected event
//! leaves the tree untouched. Removal does not cascade to descendants: a
//! worker on a child whose parent it no longer caches is unreachable from the
//! root and simply never scores past the gap, as in the reference.

use hashbrown::HashTable;
use smallvec::SmallVec;

use super::fast_hash::{IntMap, edge_hash};
use super::worker_set::WorkerSet;
use super::{EventKind, EventStats, KvCacheEventError};
use crate::hash::{ExternalSequenceBlockHash, LocalBlockHash};
use crate::protocols::{
    KvCacheEvent, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData, OverlapScores,
    RouterEvent, WorkerId, WorkerKey, WorkerOverlap,
};

const ROOT: u32 = 0;
/// Parent of a node on the free list.
const FREE: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Node {
    local: u64,
    /// The engine hash of the worker that created the node (used by dumps).
    ext: u64,
    parent: u32,
    children: u32,
    workers: WorkerSet,
}

#[derive(Debug, Default)]
struct WorkerSlot {
    key: Option<WorkerKey>,
    /// Engine block hash → node.
    blocks: IntMap<u64, u32>,
}

/// The exact KV prefix index (single-threaded; see [`super::ShardedIndex`] for threads).
#[derive(Debug)]
pub struct RadixIndex {
    nodes: Vec<Node>,
    free_nodes: Vec<u32>,
    edges: HashTable<u32>,
    slots: Vec<WorkerSlot>,
    free_slots: Vec<u32>,
    dense: IntMap<WorkerKey, u32>,
    size: usize,
    stats: EventStats,
}

impl Default for RadixIndex {
    fn default() -> Self {
        Self::new()
    }
}

/// Validation scratch: an event with more blocks than this is checked by sorting.
const SMALL_EVENT: usize = 24;

impl RadixIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            nodes: vec![Node {
                local: 0,
                ext: 0,
                parent: ROOT,
                children: 0,
                workers: WorkerSet::default(),
            }],
            free_nodes: Vec::new(),
            edges: HashTable::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            dense: IntMap::default(),
            size: 0,
            stats: EventStats::default(),
        }
    }

    /// Rebuilds an index from events (typically a [`Self::dump_events`] result).
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a RouterEvent>) -> Self {
        let mut index = Self::new();
        for ev in events {
            // Errors are counted in the new index's stats; a dump replays cleanly.
            let _ = index.apply_event(ev);
        }
        index
    }

    /// Applies one event. On error nothing changed except for `removed`, whose
    /// known hashes are still removed (the first error is returned).
    pub fn apply_event(&mut self, ev: &RouterEvent) -> Result<(), KvCacheEventError> {
        let key = ev.worker_key();
        let (kind, result) = match &ev.event.data {
            KvCacheEventData::Stored(s) => (
                EventKind::Stored,
                self.store(key, s.parent_hash.map(|p| p.0), s.blocks.len(), |i| {
                    (s.blocks[i].block_hash.0, s.blocks[i].tokens_hash.0)
                }),
            ),
            KvCacheEventData::Removed(r) => (
                EventKind::Removed,
                self.remove(key, r.block_hashes.iter().map(|h| h.0)),
            ),
            KvCacheEventData::Cleared => {
                self.clear_worker(ev.worker_id);
                (EventKind::Cleared, Ok(()))
            }
        };
        self.stats.record(kind, result);
        result
    }

    /// Stores a chain of `n` blocks `(engine hash, local hash)` for `key` under `parent`.
    pub fn store(
        &mut self,
        key: WorkerKey,
        parent: Option<u64>,
        n: usize,
        block: impl Fn(usize) -> (u64, u64),
    ) -> Result<(), KvCacheEventError> {
        // Validate first: a rejected event must not leave half a chain behind.
        let existing = self.dense.get(&key).copied();
        let mut at = ROOT;
        if let Some(p) = parent {
            let found = existing.and_then(|w| self.slots[w as usize].blocks.get(&p).copied());
            match found {
                Some(node) => at = node,
                None => return Err(KvCacheEventError::ParentBlockNotFound),
            }
        }
        if has_duplicate(parent, n, &block) {
            return Err(KvCacheEventError::InvalidBlockSequence);
        }
        if n == 0 {
            return Ok(());
        }
        let w = match existing {
            Some(w) => w,
            None => self.add_slot(key),
        };
        for i in 0..n {
            let (ext, local) = block(i);
            let mut child = self.find_child(at, local);
            if let Some(old) = self.slots[w as usize].blocks.get(&ext).copied() {
                if child == Some(old) {
                    at = old; // a duplicate store: already cached here
                    continue;
                }
                // The worker now places this engine hash elsewhere: latest wins.
                self.slots[w as usize].blocks.remove(&ext);
                self.size -= 1;
                self.release(old, w);
                // Releasing may free an empty, childless path, including `child`.
                child = self.find_child(at, local);
            }
            let node = match child {
                Some(c) => c,
                None => self.new_node(at, local, ext),
            };
            self.nodes[node as usize].workers.insert(w);
            self.slots[w as usize].blocks.insert(ext, node);
            self.size += 1;
            at = node;
        }
        Ok(())
    }

    /// Removes blocks of `key` by engine hash; unknown hashes are reported, the rest applied.
    pub fn remove(
        &mut self,
        key: WorkerKey,
        hashes: impl IntoIterator<Item = u64>,
    ) -> Result<(), KvCacheEventError> {
        let mut result = Ok(());
        let w = self.dense.get(&key).copied();
        for h in hashes {
            let node = w.and_then(|w| self.slots[w as usize].blocks.remove(&h));
            match (w, node) {
                (Some(w), Some(node)) => {
                    self.size -= 1;
                    self.release(node, w);
                }
                _ => {
                    if result.is_ok() {
                        result = Err(KvCacheEventError::BlockNotFound);
                    }
                }
            }
        }
        result
    }

    /// Drops every block of every rank of `worker_id`; the ranks stay known, with size 0.
    pub fn clear_worker(&mut self, worker_id: WorkerId) {
        for w in self.ranks_of(worker_id) {
            self.clear_slot(w);
        }
    }

    /// Forgets `worker_id` entirely (every rank), as when it leaves discovery.
    pub fn remove_worker(&mut self, worker_id: WorkerId) {
        for w in self.ranks_of(worker_id) {
            self.clear_slot(w);
            self.drop_slot(w);
        }
    }

    /// Forgets one rank of a worker.
    pub fn remove_worker_rank(&mut self, key: WorkerKey) {
        if let Some(&w) = self.dense.get(&key) {
            self.clear_slot(w);
            self.drop_slot(w);
        }
    }

    /// Per worker, the number of contiguous blocks of `seq` it caches from the start.
    pub fn find_matches(&self, seq: &[LocalBlockHash]) -> OverlapScores {
        let Some((first, rest)) = seq.split_first() else {
            return OverlapScores::default();
        };
        let Some(mut at) = self.find_child(ROOT, first.0) else {
            return OverlapScores::default();
        };
        // (dense worker, score); the first `alive` entries still match.
        let mut live: SmallVec<[(u32, u32); 32]> =
            self.nodes[at as usize].workers.distinct().map(|w| (w, 0)).collect();
        let mut alive = live.len();
        let mut depth = 1u32;
        for h in rest {
            let Some(child) = self.find_child(at, h.0) else {
                break;
            };
            let set = &self.nodes[child as usize].workers;
            let mut i = 0;
            while i < alive {
                if set.contains(live[i].0) {
                    i += 1;
                } else {
                    live[i].1 = depth;
                    alive -= 1;
                    live.swap(i, alive);
                }
            }
            if alive == 0 {
                break;
            }
            depth += 1;
            at = child;
        }
        let mut scores = Vec::with_capacity(live.len());
        for (i, &(w, score)) in live.iter().enumerate() {
            let slot = &self.slots[w as usize];
            scores.push(WorkerOverlap {
                worker: slot.key.expect("live worker slot has a key"),
                blocks: if i < alive { depth } else { score },
                tree_size: slot.blocks.len(),
            });
        }
        OverlapScores { scores }
    }

    /// Blocks held in total, summed over workers (`current_size` in the reference).
    pub fn current_size(&self) -> usize {
        self.size
    }

    /// Distinct blocks (tree nodes) held, excluding the root.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - 1 - self.free_nodes.len()
    }

    /// Blocks held for one worker rank.
    pub fn worker_size(&self, key: WorkerKey) -> usize {
        self.dense
            .get(&key)
            .map_or(0, |&w| self.slots[w as usize].blocks.len())
    }

    /// Every worker rank the index knows, in increasing order.
    pub fn workers(&self) -> Vec<WorkerKey> {
        let mut v: Vec<_> = self.dense.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Applied / rejected event counts.
    pub fn stats(&self) -> &EventStats {
        &self.stats
    }

    /// Whether the index holds nothing at all (no nodes, no blocks).
    pub fn is_empty(&self) -> bool {
        self.size == 0 && self.node_count() == 0
    }

    /// The index as single-block `stored` events in breadth-first order.
    ///
    /// Replaying them into an empty index gives the same answers. A worker's
    /// blocks that are unreachable from the root (its parent block was removed
    /// while children stayed) are left out: they can never score.
    pub fn dump_events(&self) -> Vec<RouterEvent> {
        let order = self.nodes_by_depth();
        // Per node, the workers emitted for it (reachable from the root).
        let mut emitted: Vec<SmallVec<[u32; 4]>> = vec![SmallVec::new(); self.nodes.len()];
        let mut out = Vec::with_capacity(self.size);
        for id in order {
            let node = &self.nodes[id as usize];
            let parent_hash =
                (node.parent != ROOT).then(|| ExternalSequenceBlockHash(self.nodes[node.parent as usize].ext));
            let mine: SmallVec<[u32; 4]> = node
                .workers
                .distinct()
                .filter(|w| node.parent == ROOT || emitted[node.parent as usize].contains(w))
                .collect();
            for &w in &mine {
                let key = self.slots[w as usize].key.expect("live slot");
                out.push(RouterEvent::new(
                    key.worker_id,
                    KvCacheEvent {
                        event_id: out.len() as u64,
                        dp_rank: key.dp_rank,
                        data: KvCacheEventData::Stored(KvCacheStoreData {
                            parent_hash,
                            blocks: vec![KvCacheStoredBlockData {
                                block_hash: ExternalSequenceBlockHash(node.ext),
                                tokens_hash: LocalBlockHash(node.local),
                                mm_extra_info: None,
                            }],
                        }),
                    },
                ));
            }
            emitted[id as usize] = mine;
        }
        out
    }

    /// Checks every structural invariant; for tests and fuzzing.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut refs: IntMap<(u32, u32), usize> = IntMap::default();
        let mut size = 0;
        for (w, slot) in self.slots.iter().enumerate() {
            if slot.key.is_none() && !slot.blocks.is_empty() {
                return Err(format!("dropped slot {w} holds blocks"));
            }
            size += slot.blocks.len();
            for &node in slot.blocks.values() {
                if self.nodes.get(node as usize).is_none_or(|n| n.parent == FREE) {
                    return Err(format!("slot {w} points at dead node {node}"));
                }
                *refs.entry((node, w as u32)).or_default() += 1;
            }
        }
        if size != self.size {
            return Err(format!("size {} but slots hold {size}", self.size));
        }
        let mut children = vec![0u32; self.nodes.len()];
        let mut live = 0;
        for (id, n) in self.nodes.iter().enumerate().skip(1) {
            if n.parent == FREE {
                continue;
            }
            live += 1;
            children[n.parent as usize] += 1;
            if n.workers.is_empty() && n.children == 0 {
                return Err(format!("node {id} is empty and childless but alive"));
            }
            if self.find_child(n.parent, n.local) != Some(id as u32) {
                return Err(format!("node {id} is not reachable through its edge"));
            }
            for w in n.workers.distinct() {
                let on_node = n.workers.count(w);
                if refs.get(&(id as u32, w)).copied().unwrap_or(0) != on_node {
                    return Err(format!("node {id} lists worker {w} {on_node}x, maps disagree"));
                }
            }
        }
        for (id, n) in self.nodes.iter().enumerate() {
            if n.parent != FREE && n.children != children[id] {
                return Err(format!("node {id} counts {} children, has {}", n.children, children[id]));
            }
        }
        if refs.len() != self.nodes.iter().skip(1).filter(|n| n.parent != FREE).map(|n| n.workers.distinct().count()).sum::<usize>() {
            return Err("a worker map points at a node that does not list it".into());
        }
        if self.edges.len() != live {
            return Err(format!("{} edges for {live} live nodes", self.edges.len()));
        }
        Ok(())
    }

    // === internals ===

    #[inline(always)]
    fn find_child(&self, parent: u32, local: u64) -> Option<u32> {
        let nodes = &self.nodes;
        self.edges
            .find(edge_hash(parent, local), |&id| {
                let n = &nodes[id as usize];
                n.local == local && n.parent == parent
            })
            .copied()
    }

    fn new_node(&mut self, parent: u32, local: u64, ext: u64) -> u32 {
        let node = Node {
            local,
            ext,
            parent,
            children: 0,
            workers: WorkerSet::default(),
        };
        let id = match self.free_nodes.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.nodes[parent as usize].children += 1;
        let nodes = &self.nodes;
        self.edges.insert_unique(edge_hash(parent, local), id, |&n| {
            let n = &nodes[n as usize];
            edge_hash(n.parent, n.local)
        });
        id
    }

    /// Drops one occurrence of worker `w` from `node`, freeing what became unused.
    fn release(&mut self, node: u32, w: u32) {
        let removed = self.nodes[node as usize].workers.remove_one(w);
        debug_assert!(removed, "worker map and node sets disagree");
        let mut at = node;
        while at != ROOT {
            let n = &self.nodes[at as usize];
            if !n.workers.is_empty() || n.children > 0 {
                break;
            }
            let (parent, hash) = (n.parent, edge_hash(n.parent, n.local));
            if let Ok(entry) = self.edges.find_entry(hash, |&id| id == at) {
                entry.remove();
            }
            let n = &mut self.nodes[at as usize];
            n.parent = FREE;
            n.workers.release();
            self.free_nodes.push(at);
            self.nodes[parent as usize].children -= 1;
            at = parent;
        }
        if self.node_count() == 0 {
            // Everything is gone: hand the memory back rather than keep peak capacity.
            self.nodes.truncate(1);
            self.nodes.shrink_to_fit();
            self.free_nodes = Vec::new();
            self.edges = HashTable::new();
        }
    }

    fn add_slot(&mut self, key: WorkerKey) -> u32 {
        let slot = WorkerSlot {
            key: Some(key),
            blocks: IntMap::default(),
        };
        let w = match self.free_slots.pop() {
            Some(w) => {
                self.slots[w as usize] = slot;
                w
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        self.dense.insert(key, w);
        w
    }

    fn drop_slot(&mut self, w: u32) {
        if let Some(key) = self.slots[w as usize].key.take() {
            self.dense.remove(&key);
            self.slots[w as usize].blocks = IntMap::default();
            self.free_slots.push(w);
        }
    }

    fn clear_slot(&mut self, w: u32) {
        let blocks = std::mem::take(&mut self.slots[w as usize].blocks);
        self.size -= blocks.len();
        for (_, node) in blocks {
            self.release(node, w);
        }
    }

    fn ranks_of(&self, worker_id: WorkerId) -> SmallVec<[u32; 4]> {
        self.dense
            .iter()
            .filter(|(k, _)| k.worker_id == worker_id)
            .map(|(_, &w)| w)
            .collect()
    }

    /// Live node ids (not the root), parents before children, breadth-first.
    fn nodes_by_depth(&self) -> Vec<u32> {
        const UNKNOWN: u32 = u32::MAX;
        let mut depth = vec![UNKNOWN; self.nodes.len()];
        depth[ROOT as usize] = 0;
        let mut stack = Vec::new();
        for id in 1..self.nodes.len() as u32 {
            if self.nodes[id as usize].parent == FREE {
                continue;
            }
            let mut at = id;
            while depth[at as usize] == UNKNOWN {
                stack.push(at);
                at = self.nodes[at as usize].parent;
            }
            let mut d = depth[at as usize];
            while let Some(n) = stack.pop() {
                d += 1;
                depth[n as usize] = d;
            }
        }
        let mut order: Vec<u32> = (1..self.nodes.len() as u32)
            .filter(|&id| self.nodes[id as usize].parent != FREE)
            .collect();
        order.sort_by_key(|&id| (depth[id as usize], id));
        order
    }
}

/// Whether an engine hash repeats within a stored event (parent included): such
/// a chain would make a block its own ancestor.
fn has_duplicate(parent: Option<u64>, n: usize, block: &impl Fn(usize) -> (u64, u64)) -> bool {
    let total = n + usize::from(parent.is_some());
    let get = |i: usize| match parent {
        Some(p) if i == n => p,
        _ => block(i).0,
    };
    if total <= SMALL_EVENT {
        (0..total).any(|i| (i + 1..total).any(|j| get(i) == get(j)))
    } else {
        let mut all: Vec<u64> = (0..total).map(get).collect();
        all.sort_unstable();
        all.windows(2).any(|w| w[0] == w[1])
    }
}
