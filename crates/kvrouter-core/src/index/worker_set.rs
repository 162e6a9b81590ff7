//! The set of workers caching one node: a sorted multiset of dense worker ids.
//!
//! Most nodes are cached by one to four workers, so the ids live inline (no
//! heap allocation) and membership is a short linear scan; a node shared by
//! many workers (a system prompt) spills to the heap and is binary-searched.
//! It is a multiset because one worker may reach one node through two engine
//! hashes (aliases); each alias holds one occurrence, so removing one alias
//! never hides the other.

use smallvec::SmallVec;

/// Below this size a linear scan beats a binary search.
const LINEAR_SCAN_MAX: usize = 16;

#[derive(Debug, Default, Clone)]
pub(crate) struct WorkerSet(SmallVec<[u32; 4]>);

impl WorkerSet {
    /// Adds one occurrence of `w`.
    #[inline]
    pub(crate) fn insert(&mut self, w: u32) {
        let at = self.0.partition_point(|&x| x < w);
        self.0.insert(at, w);
    }

    /// Removes one occurrence of `w`; false when absent.
    #[inline]
    pub(crate) fn remove_one(&mut self, w: u32) -> bool {
        let at = self.0.partition_point(|&x| x < w);
        if self.0.get(at) == Some(&w) {
            self.0.remove(at);
            true
        } else {
            false
        }
    }

    #[inline(always)]
    pub(crate) fn contains(&self, w: u32) -> bool {
        if self.0.len() <= LINEAR_SCAN_MAX {
            self.0.contains(&w)
        } else {
            self.0.binary_search(&w).is_ok()
        }
    }

    #[inline(always)]
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Occurrences of `w`.
    pub(crate) fn count(&self, w: u32) -> usize {
        self.0.iter().filter(|&&x| x == w).count()
    }

    /// Each worker once, in increasing order.
    pub(crate) fn distinct(&self) -> impl Iterator<Item = u32> + '_ {
        let s = &self.0;
        s.iter()
            .enumerate()
            .filter(move |(i, w)| *i == 0 || s[i - 1] != **w)
            .map(|(_, w)| *w)
    }

    /// Drops any heap buffer (for freed nodes).
    pub(crate) fn release(&mut self) {
        self.0 = SmallVec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiset_semantics() {
        let mut s = WorkerSet::default();
        for w in [5, 1, 5, 9, 3, 20, 7] {
            s.insert(w);
        }
        assert_eq!(s.distinct().collect::<Vec<_>>(), vec![1, 3, 5, 7, 9, 20]);
        assert!(s.remove_one(5));
        assert!(s.contains(5));
        assert!(s.remove_one(5));
        assert!(!s.contains(5));
        assert!(!s.remove_one(5));
        for w in 100..200 {
            s.insert(w);
        }
        assert!(s.contains(150) && !s.contains(99));
    }
}
