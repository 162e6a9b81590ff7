//! Worker sets of tree nodes: one worker inline, more in a shared pool.
//!
//! A node is usually cached by a single worker, so its set is one `u32` in the
//! node itself: a worker id, or (high bit set) the index of a sorted vector in
//! [`SetPool`] when two or more workers share the block (a system prompt).
//! Keeping the common case inline makes a tree node 24 bytes, which is what
//! lets long chains stream through the cache during a lookup.

use smallvec::SmallVec;

/// An empty set.
pub(crate) const EMPTY: u32 = u32::MAX;
const POOLED: u32 = 1 << 31;
/// Below this size a linear scan beats a binary search.
const LINEAR_SCAN_MAX: usize = 16;

/// Largest dense worker id a set can hold.
pub(crate) const MAX_WORKER: u32 = POOLED - 1;

/// Sorted vectors of worker ids for nodes shared by several workers.
#[derive(Debug, Default)]
pub(crate) struct SetPool {
    sets: Vec<SmallVec<[u32; 6]>>,
    free: Vec<u32>,
}

impl SetPool {
    #[inline(always)]
    pub(crate) fn contains(&self, set: u32, w: u32) -> bool {
        if set & POOLED == 0 {
            return set == w;
        }
        if set == EMPTY {
            return false;
        }
        let v = &self.sets[(set & !POOLED) as usize];
        if v.len() <= LINEAR_SCAN_MAX {
            v.contains(&w)
        } else {
            v.binary_search(&w).is_ok()
        }
    }

    /// Adds `w` (no-op when present); returns the new set handle.
    #[inline]
    pub(crate) fn insert(&mut self, set: u32, w: u32) -> u32 {
        debug_assert!(w <= MAX_WORKER);
        if set == EMPTY {
            return w;
        }
        if set & POOLED == 0 {
            if set == w {
                return set;
            }
            let mut v = SmallVec::new();
            v.push(set.min(w));
            v.push(set.max(w));
            let idx = match self.free.pop() {
                Some(i) => {
                    self.sets[i as usize] = v;
                    i
                }
                None => {
                    self.sets.push(v);
                    (self.sets.len() - 1) as u32
                }
            };
            return idx | POOLED;
        }
        let v = &mut self.sets[(set & !POOLED) as usize];
        if let Err(at) = v.binary_search(&w) {
            v.insert(at, w);
        }
        set
    }

    /// Removes `w`; returns the new handle, or `None` when `w` was absent.
    #[inline]
    pub(crate) fn remove(&mut self, set: u32, w: u32) -> Option<u32> {
        if set & POOLED == 0 {
            return (set == w).then_some(EMPTY);
        }
        if set == EMPTY {
            return None;
        }
        let idx = set & !POOLED;
        let v = &mut self.sets[idx as usize];
        let at = v.binary_search(&w).ok()?;
        v.remove(at);
        if v.len() == 1 {
            let last = v[0];
            self.sets[idx as usize] = SmallVec::new();
            self.free.push(idx);
            return Some(last);
        }
        Some(set)
    }

    /// The workers of a pooled set as a slice; `None` for empty and inline sets.
    #[inline(always)]
    pub(crate) fn pooled(&self, set: u32) -> Option<&[u32]> {
        (set & POOLED != 0 && set != EMPTY).then(|| &self.sets[(set & !POOLED) as usize][..])
    }

    /// The workers of a set, in increasing order.
    #[inline]
    pub(crate) fn members(&self, set: u32) -> impl Iterator<Item = u32> + '_ {
        let (single, pooled): (Option<u32>, &[u32]) = if set == EMPTY {
            (None, &[])
        } else if set & POOLED == 0 {
            (Some(set), &[])
        } else {
            (None, &self.sets[(set & !POOLED) as usize])
        };
        single.into_iter().chain(pooled.iter().copied())
    }

    /// Live pooled sets (for invariant checks).
    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        self.sets.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_then_pooled_then_inline_again() {
        let mut pool = SetPool::default();
        let mut s = EMPTY;
        s = pool.insert(s, 5);
        assert_eq!(s, 5);
        assert_eq!(pool.insert(s, 5), 5, "set semantics");
        for w in [1, 9, 3, 7] {
            s = pool.insert(s, w);
        }
        assert_eq!(pool.members(s).collect::<Vec<_>>(), vec![1, 3, 5, 7, 9]);
        assert!(pool.contains(s, 7) && !pool.contains(s, 8));
        for w in [1, 9, 3, 7] {
            s = pool.remove(s, w).unwrap();
        }
        assert_eq!(s, 5, "back inline");
        assert_eq!(pool.live(), 0, "pooled vector recycled");
        assert_eq!(pool.remove(s, 4), None);
        assert_eq!(pool.remove(s, 5), Some(EMPTY));
        assert_eq!(pool.members(EMPTY).count(), 0);
        let mut big = EMPTY;
        for w in (0..100).rev() {
            big = pool.insert(big, w);
        }
        assert!(pool.contains(big, 42) && !pool.contains(big, 100));
    }
}
