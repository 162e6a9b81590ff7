//! The engine's paged KV cache: refcounted active blocks, an LRU of cached ones.
//!
//! A full block is named by its sequence hash and may be shared by every
//! request whose prompt starts the same way. While a running request uses it,
//! it is *active* (refcounted); when the last user finishes it stays cached as
//! *inactive*, in least-recently-released order, until its slot is needed for a
//! new block. A block being filled is *partial*: it owns a slot but no name
//! until it is full, when it is promoted (and shared, if the same content is
//! already cached). Capacity counts every slot. Evictions and new full blocks
//! are recorded as KV events, in order, for the engine to publish.

use std::collections::BTreeMap;

use kvrouter_core::protocols::{
    KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData,
};
use kvrouter_core::{ExternalSequenceBlockHash, LocalBlockHash};
use rustc_hash::FxHashMap;

/// A full block: its sequence hash (the engine's block hash) and content hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FullBlock {
    /// Rolling hash of the prefix up to this block (names the block).
    pub seq: u64,
    /// Hash of this block's tokens alone.
    pub local: u64,
}

/// The KV cache of one engine rank.
#[derive(Debug)]
pub struct BlockManager {
    capacity: usize,
    /// Slots in use: active + inactive full blocks + partial blocks.
    used: usize,
    active: FxHashMap<u64, u32>,
    /// Release order → hash (oldest first), and hash → its release order.
    lru: BTreeMap<u64, u64>,
    inactive: FxHashMap<u64, u64>,
    tick: u64,
    partials: usize,
    prefix_caching: bool,
    events: Vec<KvCacheEventData>,
}

impl BlockManager {
    /// An empty cache of `capacity` blocks.
    pub fn new(capacity: usize, prefix_caching: bool) -> Self {
        Self {
            capacity,
            used: 0,
            active: FxHashMap::default(),
            lru: BTreeMap::new(),
            inactive: FxHashMap::default(),
            tick: 0,
            partials: 0,
            prefix_caching,
            events: Vec::new(),
        }
    }

    /// Total slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots held by running requests (active full blocks and partial blocks).
    pub fn active_slots(&self) -> usize {
        self.used - self.inactive.len()
    }

    /// Full blocks cached (active or inactive): what the router's index should hold.
    pub fn cached_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.active.keys().chain(self.inactive.keys()).copied()
    }

    /// Whether a full block is cached.
    pub fn contains(&self, seq: u64) -> bool {
        self.active.contains_key(&seq) || self.inactive.contains_key(&seq)
    }

    /// Whether a full block is cached but unused (evictable).
    pub fn is_inactive(&self, seq: u64) -> bool {
        self.inactive.contains_key(&seq)
    }

    /// Leading blocks of `chain` that are cached (0 without prefix caching).
    pub fn cached_prefix(&self, chain: &[u64]) -> usize {
        if !self.prefix_caching {
            return 0;
        }
        chain.iter().take_while(|h| self.contains(**h)).count()
    }

    /// Slots that could be handed out now, evicting cached blocks if needed.
    pub fn allocatable(&self) -> usize {
        self.capacity - self.used + self.inactive.len()
    }

    /// Takes a reference on a cached full block (reactivating an inactive one).
    pub fn acquire(&mut self, seq: u64) {
        if let Some(c) = self.active.get_mut(&seq) {
            *c += 1;
        } else if let Some(t) = self.inactive.remove(&seq) {
            self.lru.remove(&t);
            self.active.insert(seq, 1);
        } else {
            debug_assert!(false, "acquire of a block that is not cached");
        }
    }

    /// A slot for a block being filled; evicts the least recently released
    /// cached block when full. False when every slot is in use by running requests.
    pub fn allocate_partial(&mut self) -> bool {
        if self.used == self.capacity && !self.evict_one() {
            return false;
        }
        self.used += 1;
        self.partials += 1;
        true
    }

    /// A partial block became full. Returns true when it is new to the cache
    /// (the caller publishes it as stored); false when identical content was
    /// cached already, which is then shared and the partial slot freed.
    pub fn promote(&mut self, seq: u64) -> bool {
        self.partials -= 1;
        if self.prefix_caching && self.contains(seq) {
            self.used -= 1;
            self.acquire(seq);
            return false;
        }
        // Without prefix caching blocks are never shared: name them uniquely.
        *self.active.entry(seq).or_insert(0) += 1;
        self.prefix_caching
    }

    /// Drops a reference to a full block; the last one makes it evictable.
    pub fn release(&mut self, seq: u64) {
        let Some(c) = self.active.get_mut(&seq) else {
            debug_assert!(false, "release of a block that is not active");
            return;
        };
        *c -= 1;
        let last = *c == 0;
        if last {
            self.active.remove(&seq);
        }
        if !self.prefix_caching {
            // Unshared: every reference owns its own slot.
            self.used -= 1;
        } else if last {
            self.tick += 1;
            self.lru.insert(self.tick, seq);
            self.inactive.insert(seq, self.tick);
        }
    }

    /// Frees a partial block's slot.
    pub fn release_partial(&mut self) {
        self.partials -= 1;
        self.used -= 1;
    }

    /// Records a chain of newly stored blocks under `parent`.
    pub fn record_stored(&mut self, parent: Option<u64>, blocks: &[FullBlock]) {
        if blocks.is_empty() || !self.prefix_caching {
            return;
        }
        self.events.push(KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: parent.map(ExternalSequenceBlockHash),
            blocks: blocks
                .iter()
                .map(|b| KvCacheStoredBlockData {
                    block_hash: ExternalSequenceBlockHash(b.seq),
                    tokens_hash: LocalBlockHash(b.local),
                    mm_extra_info: None,
                })
                .collect(),
        }));
    }

    /// Drops every cached (inactive) block, as an engine reset does.
    pub fn clear_cached(&mut self) {
        self.used -= self.inactive.len();
        self.inactive.clear();
        self.lru.clear();
        if self.prefix_caching {
            self.events.push(KvCacheEventData::Cleared);
        }
    }

    /// Events recorded since the last call, in order.
    pub fn take_events(&mut self) -> Vec<KvCacheEventData> {
        std::mem::take(&mut self.events)
    }

    fn evict_one(&mut self) -> bool {
        let Some((_, seq)) = self.lru.pop_first() else {
            return false;
        };
        self.inactive.remove(&seq);
        self.used -= 1;
        // Consecutive evictions go out as one `removed` event.
        match self.events.last_mut() {
            Some(KvCacheEventData::Removed(r)) => {
                r.block_hashes.push(ExternalSequenceBlockHash(seq))
            }
            _ => self
                .events
                .push(KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: vec![ExternalSequenceBlockHash(seq)],
                })),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fb(seq: u64) -> FullBlock {
        FullBlock {
            seq,
            local: seq + 100,
        }
    }

    #[test]
    fn prefix_hit_reuse_and_lru_eviction_order() {
        let mut m = BlockManager::new(3, true);
        for h in [1, 2, 3] {
            assert!(m.allocate_partial());
            assert!(m.promote(h));
        }
        m.record_stored(None, &[fb(1), fb(2), fb(3)]);
        assert!(!m.allocate_partial(), "all slots active");
        // Release tail first, as a finished request does: 3 is the oldest cached.
        for h in [3, 2, 1] {
            m.release(h);
        }
        assert_eq!(m.cached_prefix(&[1, 2, 3, 4]), 3);
        m.acquire(1); // a new request reuses the shared prefix
        assert!(m.allocate_partial());
        assert!(m.allocate_partial());
        assert!(!m.contains(3) && !m.contains(2) && m.contains(1));
        let ev = m.take_events();
        assert_eq!(ev.len(), 2);
        assert_eq!(
            ev[1],
            KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: vec![ExternalSequenceBlockHash(3), ExternalSequenceBlockHash(2)]
            })
        );
        assert_eq!(m.active_slots(), 3);
    }

    #[test]
    fn promoting_cached_content_shares_it() {
        let mut m = BlockManager::new(4, true);
        assert!(m.allocate_partial());
        assert!(m.promote(7));
        assert!(m.allocate_partial());
        assert!(!m.promote(7), "same content: shared, not stored twice");
        assert_eq!(m.active_slots(), 1);
        m.release(7);
        m.release(7);
        assert_eq!(m.cached_prefix(&[7]), 1);
        assert_eq!(m.active_slots(), 0);
    }

    #[test]
    fn without_prefix_caching_nothing_is_reused_or_published() {
        let mut m = BlockManager::new(2, false);
        assert!(m.allocate_partial());
        assert!(!m.promote(5));
        m.record_stored(None, &[fb(5)]);
        m.release(5);
        assert_eq!(m.cached_prefix(&[5]), 0);
        assert_eq!(m.allocatable(), 2);
        assert!(m.take_events().is_empty());
    }
}
