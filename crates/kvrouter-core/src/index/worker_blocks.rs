//! One worker's map from engine block hash to tree node, four bytes per entry.
//!
//! Almost always the worker's hash for a node is the hash the node was created
//! with (engines of one deployment hash alike), so the table stores just the
//! node id and compares the key against the node's own engine hash, which the
//! caller reads from the node it is about to touch anyway. That makes entries
//! a quarter the size of a `(u64, u32)` map, and the table four times likelier
//! to be in cache: this map is the one per-block hash operation every event
//! pays. A worker whose hash for a node differs (another engine's hashing) is
//! kept in a small ordinary alias map instead.

use hashbrown::HashTable;

use crate::fast_hash::{IntHasher, IntMap};
use std::hash::Hasher;

#[inline(always)]
fn hash(ext: u64) -> u64 {
    let mut h = IntHasher::default();
    h.write_u64(ext);
    h.finish()
}

/// Engine hash → node for one worker (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct WorkerBlocks {
    table: HashTable<u32>,
    aliases: IntMap<u64, u32>,
}

impl WorkerBlocks {
    /// Blocks held.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.table.len() + self.aliases.len()
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The node the worker holds under `ext`.
    #[inline(always)]
    pub(crate) fn get(&self, ext: u64, ext_of: impl Fn(u32) -> u64) -> Option<u32> {
        if let Some(&n) = self.table.find(hash(ext), |&n| ext_of(n) == ext) {
            return Some(n);
        }
        if self.aliases.is_empty() {
            None
        } else {
            self.aliases.get(&ext).copied()
        }
    }

    /// Records `ext → node`; the caller has checked `ext` is not held yet.
    #[inline(always)]
    pub(crate) fn insert(&mut self, ext: u64, node: u32, ext_of: impl Fn(u32) -> u64) {
        if ext_of(node) == ext {
            self.table
                .insert_unique(hash(ext), node, |&n| hash(ext_of(n)));
        } else {
            self.aliases.insert(ext, node);
        }
    }

    /// Forgets `ext`, returning its node.
    #[inline(always)]
    pub(crate) fn remove(&mut self, ext: u64, ext_of: impl Fn(u32) -> u64) -> Option<u32> {
        if let Ok(e) = self.table.find_entry(hash(ext), |&n| ext_of(n) == ext) {
            return Some(e.remove().0);
        }
        if self.aliases.is_empty() {
            None
        } else {
            self.aliases.remove(&ext)
        }
    }

    /// Every node held (each once).
    pub(crate) fn nodes(&self) -> impl Iterator<Item = u32> + '_ {
        self.table
            .iter()
            .copied()
            .chain(self.aliases.values().copied())
    }
}
