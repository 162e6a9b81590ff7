//! The exact, event-driven prefix index over every worker's cached blocks.
//!
//! Layout: one arena of 24-byte nodes. A node is the block at the end of one
//! path from the root: its edge key (the [`LocalBlockHash`]), its parent, its
//! first child, its child count and its worker set (inline when one worker
//! caches it). A step down the tree follows the parent's first-child link and
//! compares one key; only nodes with several children also keep their other
//! children in one open-addressed table of 4-byte node ids keyed by
//! `(parent, local hash)`. So a chain stored by one event costs no table
//! operation at all, and walking it reads nodes that were allocated together.
//! Per worker, a map from the engine's block hash to the node serves removals
//! and parent look-ups: the one hash operation per block that cannot be saved.
//!
//! Invariants, checked by the property tests: a worker holds a node through
//! exactly one engine hash, and is on the node's set iff its map points there;
//! a node lives while it has a worker or a child, and is freed (with its
//! now-empty ancestors) otherwise; a rejected event leaves the tree as it was
//! (a parent that is missing is found before any change; a chain that repeats
//! a block or places a held block elsewhere is rolled back). Removal does not
//! cascade to descendants: a worker on a child whose parent it no longer
//! caches is unreachable from the root and never scores past the gap.

use hashbrown::HashTable;
use smallvec::SmallVec;

use super::worker_blocks::WorkerBlocks;
use super::worker_set::{EMPTY, MAX_WORKER, SetPool};
use super::{EventKind, EventStats, KvCacheEventError};
use crate::fast_hash::{IntMap, edge_hash};
use crate::hash::{ExternalSequenceBlockHash, LocalBlockHash};
use crate::protocols::{
    KvCacheEvent, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData, OverlapScores,
    RouterEvent, WorkerId, WorkerKey, WorkerOverlap,
};

const ROOT: u32 = 0;
/// No node (a missing first child), and the parent of a node on the free list.
const NONE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    local: u64,
    /// Engine hash of the worker that created the node (the key of worker maps).
    ext: u64,
    parent: u32,
    first_child: u32,
    children: u32,
    workers: u32,
}

const _: () = assert!(std::mem::size_of::<Node>() == 32);

/// The tree proper: nodes, the overflow edge table and the worker-set pool.
#[derive(Debug)]
struct Arena {
    nodes: Vec<Node>,
    /// Children that are not their parent's first child.
    edges: HashTable<u32>,
    free: Vec<u32>,
    sets: SetPool,
}

#[derive(Debug, Default)]
struct WorkerSlot {
    key: Option<WorkerKey>,
    /// Engine block hash → node.
    blocks: WorkerBlocks,
}

/// The exact KV prefix index (single-threaded; see [`super::ShardedIndex`] for threads).
#[derive(Debug)]
pub struct RadixIndex {
    arena: Arena,
    slots: Vec<WorkerSlot>,
    free_slots: Vec<u32>,
    dense: IntMap<WorkerKey, u32>,
    size: usize,
    stats: EventStats,
    /// Mappings added by the event being applied, for rollback.
    undo: Vec<(u64, u32)>,
}

impl Default for RadixIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl RadixIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            arena: Arena::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            dense: IntMap::default(),
            size: 0,
            stats: EventStats::default(),
            undo: Vec::new(),
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
    ///
    /// Re-storing blocks the worker holds at the same place is a no-op. A chain
    /// that repeats an engine hash, or names one the worker holds at another
    /// place, is rejected as [`KvCacheEventError::InvalidBlockSequence`].
    pub fn store(
        &mut self,
        key: WorkerKey,
        parent: Option<u64>,
        n: usize,
        block: impl Fn(usize) -> (u64, u64),
    ) -> Result<(), KvCacheEventError> {
        let existing = self.dense.get(&key).copied();
        let mut at = ROOT;
        if let Some(p) = parent {
            let nodes = &self.arena.nodes;
            let ext_of = |n: u32| nodes[n as usize].ext;
            match existing.and_then(|w| self.slots[w as usize].blocks.get(p, ext_of)) {
                Some(node) => at = node,
                None => return Err(KvCacheEventError::ParentBlockNotFound),
            }
        }
        if n == 0 {
            return Ok(());
        }
        let w = match existing {
            Some(w) => w,
            None => self.add_slot(key),
        };
        let arena = &mut self.arena;
        let map = &mut self.slots[w as usize].blocks;
        self.undo.clear();
        let mut failed = false;
        for i in 0..n {
            let (ext, local) = block(i);
            let child = arena.find_child(at, local);
            let nodes = &arena.nodes;
            if let Some(held) = map.get(ext, |n| nodes[n as usize].ext) {
                if Some(held) == child {
                    at = held; // already cached here
                    continue;
                }
                failed = true; // a repeat in this chain, or held elsewhere
                break;
            }
            let node = match child {
                Some(c) if arena.has_worker(c, w) => {
                    failed = true; // held here under another hash
                    break;
                }
                Some(c) => c,
                None => arena.new_node(at, local, ext),
            };
            arena.add_worker(node, w);
            let nodes = &arena.nodes;
            map.insert(ext, node, |n| nodes[n as usize].ext);
            self.undo.push((ext, node));
            at = node;
        }
        self.size += self.undo.len();
        if failed {
            for (ext, node) in std::mem::take(&mut self.undo).into_iter().rev() {
                let nodes = &self.arena.nodes;
                self.slots[w as usize]
                    .blocks
                    .remove(ext, |n| nodes[n as usize].ext);
                self.size -= 1;
                self.arena.release(node, w);
            }
            if self.slots[w as usize].blocks.is_empty() && existing.is_none() {
                self.drop_slot(w);
            }
            return Err(KvCacheEventError::InvalidBlockSequence);
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
        let Some(&w) = self.dense.get(&key) else {
            return match hashes.into_iter().next() {
                Some(_) => Err(KvCacheEventError::BlockNotFound),
                None => Ok(()),
            };
        };
        // Two passes: the map look-ups are independent of each other, so the
        // CPU overlaps their cache misses; releasing nodes in between would not.
        let map = &mut self.slots[w as usize].blocks;
        let mut gone: SmallVec<[u32; 64]> = SmallVec::new();
        let nodes = &self.arena.nodes;
        for h in hashes {
            match map.remove(h, |n| nodes[n as usize].ext) {
                Some(node) => gone.push(node),
                None => result = Err(KvCacheEventError::BlockNotFound),
            }
        }
        self.size -= gone.len();
        for node in gone {
            self.arena.release(node, w);
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
        let arena = &self.arena;
        let Some((first, rest)) = seq.split_first() else {
            return OverlapScores::default();
        };
        let Some(mut at) = arena.find_child(ROOT, first.0) else {
            return OverlapScores::default();
        };
        // Workers still matching, sorted; and those that stopped, with their depth.
        let mut live: SmallVec<[u32; 32]> = arena
            .sets
            .members(arena.nodes[at as usize].workers)
            .collect();
        let mut done: SmallVec<[(u32, u32); 32]> = SmallVec::new();
        let mut depth = 1u32;
        for h in rest {
            let Some(child) = arena.find_child(at, h.0) else {
                break;
            };
            let set = arena.nodes[child as usize].workers;
            match arena.sets.pooled(set) {
                // A shared prefix: usually the very same workers as one level up.
                Some(members) if members == &live[..] => {}
                Some(members) => {
                    // Sorted merge: O(live + members), not a search per worker.
                    let mut j = 0;
                    live.retain(|w| {
                        while j < members.len() && members[j] < *w {
                            j += 1;
                        }
                        let keep = members.get(j) == Some(w);
                        if !keep {
                            done.push((*w, depth));
                        }
                        keep
                    });
                }
                None => live.retain(|w| {
                    let keep = *w == set;
                    if !keep {
                        done.push((*w, depth));
                    }
                    keep
                }),
            }
            if live.is_empty() {
                break;
            }
            depth += 1;
            at = child;
        }
        let mut scores = Vec::with_capacity(live.len() + done.len());
        let finished = live.iter().map(|&w| (w, depth)).chain(done);
        for (w, blocks) in finished {
            let slot = &self.slots[w as usize];
            scores.push(WorkerOverlap {
                worker: slot.key.expect("live worker slot has a key"),
                blocks,
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
        self.arena.live()
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
        let arena = &self.arena;
        let order = arena.nodes_by_depth();
        // Per node, the workers emitted for it (reachable from the root).
        let mut emitted: Vec<SmallVec<[u32; 2]>> = vec![SmallVec::new(); arena.nodes.len()];
        let mut out = Vec::with_capacity(self.size);
        for id in order {
            let node = arena.nodes[id as usize];
            let parent_hash = (node.parent != ROOT)
                .then(|| ExternalSequenceBlockHash(arena.nodes[node.parent as usize].ext));
            let mine: SmallVec<[u32; 2]> = arena
                .sets
                .members(node.workers)
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
        let arena = &self.arena;
        let mut refs: IntMap<(u32, u32), usize> = IntMap::default();
        let mut size = 0;
        for (w, slot) in self.slots.iter().enumerate() {
            if slot.key.is_none() && !slot.blocks.is_empty() {
                return Err(format!("dropped slot {w} holds blocks"));
            }
            size += slot.blocks.len();
            for node in slot.blocks.nodes() {
                if arena
                    .nodes
                    .get(node as usize)
                    .is_none_or(|n| n.parent == NONE)
                {
                    return Err(format!("slot {w} points at dead node {node}"));
                }
                *refs.entry((node, w as u32)).or_default() += 1;
            }
        }
        if size != self.size {
            return Err(format!("size {} but slots hold {size}", self.size));
        }
        if let Some(((n, w), c)) = refs.iter().find(|(_, c)| **c > 1) {
            return Err(format!("worker {w} holds node {n} through {c} hashes"));
        }
        let mut children = vec![0u32; arena.nodes.len()];
        let mut members = 0;
        let mut table_edges = 0;
        for (id, n) in arena.nodes.iter().enumerate().skip(1) {
            if n.parent == NONE {
                continue;
            }
            children[n.parent as usize] += 1;
            if arena.nodes[n.parent as usize].first_child != id as u32 {
                table_edges += 1;
            }
            if n.workers == EMPTY && n.children == 0 {
                return Err(format!("node {id} is empty and childless but alive"));
            }
            if arena.find_child(n.parent, n.local) != Some(id as u32) {
                return Err(format!("node {id} is not reachable through its edge"));
            }
            for w in arena.sets.members(n.workers) {
                members += 1;
                if !refs.contains_key(&(id as u32, w)) {
                    return Err(format!("node {id} lists worker {w}, whose map disagrees"));
                }
            }
        }
        if members != refs.len() {
            return Err("a worker map points at a node that does not list it".into());
        }
        for (id, n) in arena.nodes.iter().enumerate() {
            if n.parent != NONE && n.children != children[id] {
                return Err(format!(
                    "node {id} counts {} children, has {}",
                    n.children, children[id]
                ));
            }
        }
        if arena.edges.len() != table_edges {
            return Err(format!(
                "{} table edges, expected {table_edges}",
                arena.edges.len()
            ));
        }
        Ok(())
    }

    // === internals ===

    fn add_slot(&mut self, key: WorkerKey) -> u32 {
        let slot = WorkerSlot {
            key: Some(key),
            blocks: WorkerBlocks::default(),
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
        assert!(w <= MAX_WORKER, "more than 2^31 worker ranks");
        self.dense.insert(key, w);
        w
    }

    fn drop_slot(&mut self, w: u32) {
        if let Some(key) = self.slots[w as usize].key.take() {
            self.dense.remove(&key);
            self.slots[w as usize].blocks = WorkerBlocks::default();
            self.free_slots.push(w);
        }
    }

    fn clear_slot(&mut self, w: u32) {
        let blocks = std::mem::take(&mut self.slots[w as usize].blocks);
        self.size -= blocks.len();
        for node in blocks.nodes() {
            self.arena.release(node, w);
        }
    }

    fn ranks_of(&self, worker_id: WorkerId) -> SmallVec<[u32; 4]> {
        self.dense
            .iter()
            .filter(|(k, _)| k.worker_id == worker_id)
            .map(|(_, &w)| w)
            .collect()
    }
}

// === impl Arena ===

impl Arena {
    fn new() -> Self {
        Self {
            nodes: vec![Node {
                local: 0,
                ext: 0,
                parent: ROOT,
                first_child: NONE,
                children: 0,
                workers: EMPTY,
            }],
            edges: HashTable::new(),
            free: Vec::new(),
            sets: SetPool::default(),
        }
    }

    fn live(&self) -> usize {
        self.nodes.len() - 1 - self.free.len()
    }

    #[inline(always)]
    fn find_child(&self, parent: u32, local: u64) -> Option<u32> {
        let p = &self.nodes[parent as usize];
        let first = p.first_child;
        if first != NONE && self.nodes[first as usize].local == local {
            return Some(first);
        }
        if p.children <= u32::from(first != NONE) {
            return None;
        }
        let nodes = &self.nodes;
        self.edges
            .find(edge_hash(parent, local), |&id| {
                let n = &nodes[id as usize];
                n.local == local && n.parent == parent
            })
            .copied()
    }

    #[inline]
    fn has_worker(&self, node: u32, w: u32) -> bool {
        self.sets.contains(self.nodes[node as usize].workers, w)
    }

    #[inline]
    fn add_worker(&mut self, node: u32, w: u32) {
        let n = &mut self.nodes[node as usize];
        n.workers = self.sets.insert(n.workers, w);
    }

    fn new_node(&mut self, parent: u32, local: u64, ext: u64) -> u32 {
        let node = Node {
            local,
            ext,
            parent,
            first_child: NONE,
            children: 0,
            workers: EMPTY,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        let p = &mut self.nodes[parent as usize];
        p.children += 1;
        if p.first_child == NONE {
            p.first_child = id;
        } else {
            let nodes = &self.nodes;
            self.edges
                .insert_unique(edge_hash(parent, local), id, |&n| {
                    let n = &nodes[n as usize];
                    edge_hash(n.parent, n.local)
                });
        }
        id
    }

    /// Drops worker `w` from `node`, freeing what became unused.
    fn release(&mut self, node: u32, w: u32) {
        let n = &mut self.nodes[node as usize];
        let removed = self.sets.remove(n.workers, w);
        debug_assert!(removed.is_some(), "worker map and node sets disagree");
        n.workers = removed.unwrap_or(n.workers);
        let mut at = node;
        while at != ROOT {
            let n = self.nodes[at as usize];
            if n.workers != EMPTY || n.children > 0 {
                break;
            }
            let p = &mut self.nodes[n.parent as usize];
            p.children -= 1;
            if p.first_child == at {
                p.first_child = NONE;
            } else if let Ok(e) = self
                .edges
                .find_entry(edge_hash(n.parent, n.local), |&id| id == at)
            {
                e.remove();
            }
            self.nodes[at as usize].parent = NONE;
            self.free.push(at);
            at = n.parent;
        }
        if self.live() == 0 && self.nodes.len() > 1 {
            // Everything is gone: hand the memory back rather than keep peak capacity.
            *self = Self::new();
        }
    }

    /// Live node ids (not the root), parents before children, breadth-first.
    fn nodes_by_depth(&self) -> Vec<u32> {
        const UNKNOWN: u32 = u32::MAX;
        let mut depth = vec![UNKNOWN; self.nodes.len()];
        depth[ROOT as usize] = 0;
        let mut stack = Vec::new();
        for id in 1..self.nodes.len() as u32 {
            if self.nodes[id as usize].parent == NONE {
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
            .filter(|&id| self.nodes[id as usize].parent != NONE)
            .collect();
        order.sort_by_key(|&id| (depth[id as usize], id));
        order
    }
}
