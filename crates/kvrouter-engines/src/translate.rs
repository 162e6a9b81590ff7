//! From an engine rank's events to the router's: the router keys blocks by
//! its own hash of their tokens, never by the engine's opaque hash.
//!
//! For every stored block the router computes `tokens_hash` from its
//! `token_ids` (XXH3, seed 1337, the LoRA seed rule) at the router's block
//! size, and keeps the engine hash as the block's external id, which the
//! index resolves per (worker, rank) for parents and removals. Blocks the
//! router cannot key truthfully are dropped and counted: another block size
//! (SGLang's last page, vLLM's partial blocks, a misconfigured engine), a
//! medium other than the device, a KV group that is not full attention, a
//! salted cache, tokens that do not fill the declared blocks. Their engine
//! hashes are remembered (bounded) so that their later removals are not
//! mistaken for errors. `AllBlocksCleared` resets the rank.

use std::collections::HashSet;

use kvrouter_core::hash::BlockHasher;
use kvrouter_core::protocols::{
    KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData,
};
use kvrouter_core::{ExternalSequenceBlockHash, RouterEvent, WorkerKey};

use crate::wire::{BlockRemoved, BlockStored, EngineEvent};

/// What an engine event becomes.
#[derive(Debug, Clone, PartialEq)]
pub enum Translated {
    /// An event for the index.
    Event(RouterEvent),
    /// Forget every block of the rank.
    Reset,
}

/// Why blocks were dropped (a metric label each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dropped {
    /// `block_size` differs from the router's.
    BlockSize,
    /// A tier other than the device.
    Medium,
    /// A KV group that is not (full) attention of group 0.
    Group,
    /// A salted prefix cache.
    Salted,
    /// `token_ids` do not fill `block_hashes × block_size`.
    Malformed,
}

impl Dropped {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Dropped::BlockSize => "block_size",
            Dropped::Medium => "medium",
            Dropped::Group => "group",
            Dropped::Salted => "salted",
            Dropped::Malformed => "malformed",
        }
    }
}

/// Engine hashes of dropped blocks kept, at most (oldest forgotten first).
const DROPPED_MEMORY: usize = 65_536;

/// The translator of one engine rank.
#[derive(Debug)]
pub struct RankTranslator {
    key: WorkerKey,
    block_size: usize,
    next_event_id: u64,
    dropped: HashSet<u64>,
    dropped_order: std::collections::VecDeque<u64>,
}

/// Attention kinds whose blocks a prefix index can use (as Dynamo filters).
fn attention_kind(kind: Option<&str>, group: Option<i64>) -> bool {
    match kind {
        Some(k) => matches!(
            k,
            "full_attention" | "mla_attention" | "sink_full_attention"
        ),
        None => group.unwrap_or(0) == 0,
    }
}

/// Whether a medium names the device tier (`GPU`, any case; absent = device).
pub fn is_device(medium: Option<&str>) -> bool {
    medium.is_none_or(|m| m.eq_ignore_ascii_case("gpu"))
}

impl RankTranslator {
    /// A translator for `key`, keying blocks of `block_size` tokens.
    pub fn new(key: WorkerKey, block_size: usize) -> Self {
        Self {
            key,
            block_size: block_size.max(1),
            next_event_id: 0,
            dropped: HashSet::new(),
            dropped_order: std::collections::VecDeque::new(),
        }
    }

    /// The rank.
    pub fn key(&self) -> WorkerKey {
        self.key
    }

    /// Forgets what the rank published (after a reset).
    pub fn reset(&mut self) {
        self.dropped.clear();
        self.dropped_order.clear();
    }

    fn remember_dropped(&mut self, hashes: &[u64]) {
        for &h in hashes {
            if self.dropped.insert(h) {
                self.dropped_order.push_back(h);
            }
        }
        while self.dropped_order.len() > DROPPED_MEMORY {
            if let Some(old) = self.dropped_order.pop_front() {
                self.dropped.remove(&old);
            }
        }
    }

    fn event(&mut self, data: KvCacheEventData) -> Translated {
        let event_id = self.next_event_id;
        self.next_event_id += 1;
        Translated::Event(RouterEvent::new(
            self.key.worker_id,
            KvCacheEvent {
                event_id,
                data,
                dp_rank: self.key.dp_rank,
            },
        ))
    }

    /// Translates one event; `drop` hears about every block not indexed.
    pub fn translate(
        &mut self,
        ev: EngineEvent,
        mut drop: impl FnMut(Dropped, usize),
    ) -> Option<Translated> {
        match ev {
            EngineEvent::AllCleared => {
                self.reset();
                Some(Translated::Reset)
            }
            EngineEvent::Stored(s) => self.stored(s, &mut drop),
            EngineEvent::Removed(r) => self.removed(r),
        }
    }

    fn stored(
        &mut self,
        s: BlockStored,
        drop: &mut impl FnMut(Dropped, usize),
    ) -> Option<Translated> {
        let n = s.block_hashes.len();
        let why = if !is_device(s.medium.as_deref()) {
            Some(Dropped::Medium)
        } else if !attention_kind(s.kind.as_deref(), s.group_idx) {
            Some(Dropped::Group)
        } else if s.block_size as usize != self.block_size {
            Some(Dropped::BlockSize)
        } else if s.salted {
            Some(Dropped::Salted)
        } else if s.token_ids.len() != n * self.block_size {
            Some(Dropped::Malformed)
        } else {
            None
        };
        if let Some(why) = why {
            // Only device blocks share the index's hash space: remember those.
            if why != Dropped::Medium && why != Dropped::Group {
                self.remember_dropped(&s.block_hashes);
            }
            drop(why, n);
            return None;
        }
        if n == 0 {
            return None;
        }
        let mut hasher = BlockHasher::new(self.block_size, s.lora_name.as_deref());
        let local = hasher.block_hashes(&s.token_ids, None);
        let blocks = s
            .block_hashes
            .iter()
            .zip(local)
            .map(|(&h, l)| KvCacheStoredBlockData {
                block_hash: ExternalSequenceBlockHash(h),
                tokens_hash: l,
                mm_extra_info: None,
            })
            .collect();
        Some(self.event(KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: s.parent_block_hash.map(ExternalSequenceBlockHash),
            blocks,
        })))
    }

    fn removed(&mut self, r: BlockRemoved) -> Option<Translated> {
        if !is_device(r.medium.as_deref()) || !attention_kind(None, r.group_idx) {
            return None;
        }
        let hashes: Vec<ExternalSequenceBlockHash> = r
            .block_hashes
            .into_iter()
            .filter(|h| !self.dropped.remove(h))
            .map(ExternalSequenceBlockHash)
            .collect();
        if hashes.is_empty() {
            return None;
        }
        Some(self.event(KvCacheEventData::Removed(KvCacheRemoveData {
            block_hashes: hashes,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter_core::hash::block_hashes;

    fn store(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> EngineEvent {
        EngineEvent::Stored(BlockStored {
            block_hashes: hashes,
            parent_block_hash: parent,
            token_ids: tokens,
            block_size: bs,
            ..Default::default()
        })
    }

    #[test]
    fn keys_blocks_by_their_tokens() {
        let mut t = RankTranslator::new(WorkerKey::new(9, 1), 2);
        let out = t
            .translate(
                store(vec![100, 200], Some(50), vec![1, 2, 3, 4], 2),
                |_, _| panic!("nothing dropped"),
            )
            .unwrap();
        let Translated::Event(ev) = out else { panic!() };
        assert_eq!(ev.worker_key(), WorkerKey::new(9, 1));
        let KvCacheEventData::Stored(s) = ev.event.data else {
            panic!()
        };
        assert_eq!(s.parent_hash, Some(ExternalSequenceBlockHash(50)));
        let want = block_hashes(&[1, 2, 3, 4], 2);
        let got: Vec<_> = s.blocks.iter().map(|b| b.tokens_hash).collect();
        assert_eq!(got, want);
        assert_eq!(s.blocks[1].block_hash, ExternalSequenceBlockHash(200));
    }

    #[test]
    fn drops_what_it_cannot_key_and_swallows_their_removals() {
        let mut t = RankTranslator::new(WorkerKey::new(1, 0), 4);
        let mut dropped = Vec::new();
        // A partial last page (2 of 4 tokens).
        assert!(
            t.translate(store(vec![7], Some(6), vec![1, 2], 2), |w, n| dropped
                .push((w, n)))
                .is_none()
        );
        let cpu = EngineEvent::Stored(BlockStored {
            block_hashes: vec![8],
            token_ids: vec![1, 2, 3, 4],
            block_size: 4,
            medium: Some("CPU_PINNED".into()),
            ..Default::default()
        });
        assert!(t.translate(cpu, |w, n| dropped.push((w, n))).is_none());
        assert!(
            t.translate(store(vec![9, 10], None, vec![1, 2, 3, 4], 4), |w, n| {
                dropped.push((w, n))
            })
            .is_none()
        );
        assert_eq!(
            dropped,
            vec![
                (Dropped::BlockSize, 1),
                (Dropped::Medium, 1),
                (Dropped::Malformed, 2)
            ]
        );
        // The removal of the dropped partial block is swallowed; others pass.
        let rm = EngineEvent::Removed(BlockRemoved {
            block_hashes: vec![7, 11],
            ..Default::default()
        });
        let Some(Translated::Event(ev)) = t.translate(rm, |_, _| {}) else {
            panic!()
        };
        assert_eq!(
            ev.event.data,
            KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: vec![ExternalSequenceBlockHash(11)]
            })
        );
        assert_eq!(
            t.translate(EngineEvent::AllCleared, |_, _| {}),
            Some(Translated::Reset)
        );
    }

    #[test]
    fn lora_blocks_use_the_lora_seed() {
        let mut t = RankTranslator::new(WorkerKey::new(1, 0), 2);
        let ev = EngineEvent::Stored(BlockStored {
            block_hashes: vec![1],
            token_ids: vec![5, 6],
            block_size: 2,
            lora_name: Some("sql".into()),
            ..Default::default()
        });
        let Some(Translated::Event(ev)) = t.translate(ev, |_, _| {}) else {
            panic!()
        };
        let KvCacheEventData::Stored(s) = ev.event.data else {
            panic!()
        };
        let want = BlockHasher::new(2, Some("sql")).block_hashes(&[5, 6], None);
        assert_eq!(s.blocks[0].tokens_hash, want[0]);
        assert_ne!(want, block_hashes(&[5, 6], 2));
    }
}
