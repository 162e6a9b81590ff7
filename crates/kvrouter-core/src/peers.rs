//! Other routers' published policies, as pure selectors, so `kvrouter sim`
//! can measure kvrouter's own against them on the same engines and trace.
//!
//! Each is written from its project's documented rule, not its code, and
//! sees only what that router sees:
//!
//! - [`CacheAware`], sglang-router / SMG `cache_aware`: an approximate prefix
//!   tree per worker fed by its own routing decisions; if the load (requests
//!   in flight) is imbalanced — `max − min > balance_abs_threshold` **and**
//!   `max > balance_rel_threshold × min` — the least loaded worker; else, if
//!   the best prefix match covers more than `cache_threshold` of the prompt,
//!   the worker with that match; else the worker with the smallest tree (the
//!   most room). Defaults as SMG documents them: 0.3, 64, 1.5.
//! - [`PrefixHash`], SMG `prefix_hash`: the prompt's first
//!   `prefix_token_count` tokens hashed onto a consistent-hash ring of virtual
//!   nodes, with bounded load (Mirrokni et al.): a worker already holding
//!   `⌈load_factor × (in-flight + 1) / workers⌉` requests is passed over for
//!   the next one clockwise. Defaults 256 tokens, 1.25.
//! - [`LlmdScorers`], llm-d's inference scheduler: a weighted sum of the
//!   prefix-cache scorer (fraction of the prompt's blocks the worker caches,
//!   from KV events), the queue scorer (waiting requests, min–max normalised,
//!   fewer is better) and the KV-cache-utilisation scorer (1 − usage),
//!   picked by the max-score picker (ties at random). Weights 3 / 2 / 2, the
//!   project's inference-scheduling profile.
//!
//! The callers own the state (trees, counters, engine metrics); these only
//! choose, so they can be tested without a simulator.

use rand::{Rng, RngExt};

use crate::fast_hash::mix64;

/// What a peer policy knows of one rank when it chooses.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PeerRank {
    /// Leading prompt blocks the policy's tree (or index) places there.
    pub cached_blocks: u32,
    /// Blocks in that rank's tree (cache-aware's "smallest tree").
    pub tree_blocks: usize,
    /// Requests in flight there, as the router counts them.
    pub in_flight: usize,
    /// Requests waiting in the engine's queue (its metrics).
    pub waiting: usize,
    /// Fraction of the engine's KV blocks in use (its metrics), in [0, 1].
    pub kv_usage: f64,
}

/// sglang-router / SMG `cache_aware` (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheAware {
    /// Minimum match rate to follow the cache.
    pub cache_threshold: f64,
    /// Absolute in-flight difference that counts as imbalance.
    pub balance_abs_threshold: usize,
    /// Relative in-flight ratio that counts as imbalance.
    pub balance_rel_threshold: f64,
}

impl Default for CacheAware {
    fn default() -> Self {
        Self {
            cache_threshold: 0.3,
            balance_abs_threshold: 64,
            balance_rel_threshold: 1.5,
        }
    }
}

impl CacheAware {
    /// The chosen rank's position in `ranks` (not empty); `prompt_blocks` is
    /// the prompt's length in blocks.
    pub fn select(&self, prompt_blocks: usize, ranks: &[PeerRank]) -> usize {
        let load = |i: usize| ranks[i].in_flight;
        let least = (0..ranks.len()).min_by_key(|&i| load(i)).unwrap_or(0);
        let most = (0..ranks.len()).max_by_key(|&i| load(i)).unwrap_or(0);
        let (min, max) = (load(least), load(most));
        if max - min > self.balance_abs_threshold
            && max as f64 > self.balance_rel_threshold * min as f64
        {
            return least;
        }
        // The first of equal best matches, as a tree walk returns one tenant.
        let best = (0..ranks.len())
            .rev()
            .max_by_key(|&i| ranks[i].cached_blocks)
            .unwrap_or(0);
        let rate = ranks[best].cached_blocks as f64 / prompt_blocks.max(1) as f64;
        if rate > self.cache_threshold {
            best
        } else {
            (0..ranks.len())
                .min_by_key(|&i| ranks[i].tree_blocks)
                .unwrap_or(0)
        }
    }
}

/// SMG `prefix_hash`: a consistent-hash ring with bounded load.
#[derive(Debug, Clone)]
pub struct PrefixHash {
    /// (point, rank), sorted by point.
    ring: Vec<(u64, usize)>,
    ranks: usize,
    /// How far above the mean in-flight count a rank may run.
    pub load_factor: f64,
    /// Prompt tokens that make up the key.
    pub prefix_token_count: usize,
}

impl PrefixHash {
    /// Virtual nodes per rank: enough that each rank's arc is within a few
    /// percent of 1/n.
    pub const VIRTUAL_NODES: usize = 160;

    /// A ring over `ranks` ranks (at least one).
    pub fn new(ranks: usize, load_factor: f64, prefix_token_count: usize) -> Self {
        let mut ring: Vec<(u64, usize)> = (0..ranks.max(1))
            .flat_map(|r| {
                (0..Self::VIRTUAL_NODES).map(move |v| (mix64(((r as u64) << 32) | v as u64), r))
            })
            .collect();
        ring.sort_unstable();
        Self {
            ring,
            ranks: ranks.max(1),
            load_factor,
            prefix_token_count,
        }
    }

    /// The first block whose hash covers the key's tokens, given the
    /// prompt's full-block count (`None`: no full block, hash the whole prompt).
    pub fn key_block(&self, block_size: usize, full_blocks: usize) -> Option<usize> {
        let want = self.prefix_token_count.div_ceil(block_size.max(1)).max(1);
        (full_blocks > 0).then(|| want.min(full_blocks) - 1)
    }

    /// The rank for `key` given each rank's in-flight count (`loads.len()`
    /// ranks, the ring's).
    pub fn select(&self, key: u64, loads: &[usize]) -> usize {
        let total: usize = loads.iter().sum();
        let cap = (self.load_factor * (total + 1) as f64 / self.ranks as f64).ceil() as usize;
        let start = self.ring.partition_point(|&(p, _)| p < mix64(key));
        let n = self.ring.len();
        (0..n)
            .map(|k| self.ring[(start + k) % n].1)
            .find(|&r| loads.get(r).copied().unwrap_or(0) < cap.max(1))
            // Unreachable: the least loaded rank is always below the cap.
            .unwrap_or(self.ring[start % n].1)
    }
}

/// llm-d's weighted scorers and max-score picker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlmdScorers {
    /// Weight of the prefix-cache scorer.
    pub prefix: f64,
    /// Weight of the queue scorer.
    pub queue: f64,
    /// Weight of the KV-cache-utilisation scorer.
    pub kv_usage: f64,
}

impl Default for LlmdScorers {
    fn default() -> Self {
        Self {
            prefix: 3.0,
            queue: 2.0,
            kv_usage: 2.0,
        }
    }
}

impl LlmdScorers {
    /// Each rank's total score.
    pub fn scores(&self, prompt_blocks: usize, ranks: &[PeerRank]) -> Vec<f64> {
        let qmin = ranks.iter().map(|r| r.waiting).min().unwrap_or(0);
        let qmax = ranks.iter().map(|r| r.waiting).max().unwrap_or(0);
        ranks
            .iter()
            .map(|r| {
                let prefix = r.cached_blocks as f64 / prompt_blocks.max(1) as f64;
                let queue = if qmax == qmin {
                    1.0
                } else {
                    (qmax - r.waiting) as f64 / (qmax - qmin) as f64
                };
                let kv = 1.0 - r.kv_usage.clamp(0.0, 1.0);
                self.prefix * prefix.min(1.0) + self.queue * queue + self.kv_usage * kv
            })
            .collect()
    }

    /// The chosen rank's position in `ranks` (not empty).
    pub fn select<R: Rng + ?Sized>(
        &self,
        prompt_blocks: usize,
        ranks: &[PeerRank],
        rng: &mut R,
    ) -> usize {
        let scores = self.scores(prompt_blocks, ranks);
        let best = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let tied: Vec<usize> = (0..scores.len()).filter(|&i| scores[i] == best).collect();
        match tied.len() {
            0 => 0,
            1 => tied[0],
            n => tied[rng.random_range(0..n)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn rank(cached: u32, tree: usize, in_flight: usize) -> PeerRank {
        PeerRank {
            cached_blocks: cached,
            tree_blocks: tree,
            in_flight,
            ..PeerRank::default()
        }
    }

    #[test]
    fn cache_aware_follows_a_good_match_else_the_emptiest_tree() {
        let p = CacheAware::default();
        let ranks = [rank(2, 50, 3), rank(6, 90, 5), rank(0, 10, 1)];
        assert_eq!(p.select(10, &ranks), 1, "60% match beats the 0.3 threshold");
        let ranks = [rank(2, 50, 3), rank(3, 90, 5), rank(0, 10, 1)];
        assert_eq!(
            p.select(10, &ranks),
            2,
            "30% is not above it: smallest tree"
        );
    }

    #[test]
    fn cache_aware_balances_only_when_both_gates_open() {
        let p = CacheAware::default();
        // 100 − 30 > 64 and 100 > 1.5 × 30: imbalanced, least loaded wins.
        let ranks = [rank(9, 50, 100), rank(0, 10, 30), rank(0, 5, 40)];
        assert_eq!(p.select(10, &ranks), 1);
        // 200 − 140 ≤ 64: not imbalanced, the cache wins.
        let ranks = [rank(9, 50, 200), rank(0, 10, 140)];
        assert_eq!(p.select(10, &ranks), 0);
        // 200 − 135 > 64 but 200 ≤ 1.5 × 135: still the cache.
        let ranks = [rank(9, 50, 200), rank(0, 10, 135)];
        assert_eq!(p.select(10, &ranks), 0);
    }

    #[test]
    fn prefix_hash_is_stable_and_bounded() {
        let ring = PrefixHash::new(8, 1.25, 256);
        let idle = [0usize; 8];
        let home = ring.select(42, &idle);
        assert_eq!(ring.select(42, &idle), home, "same key, same rank");
        // Spread: 4000 keys land on every rank, none with more than twice its share.
        let mut count = [0usize; 8];
        for k in 0..4000u64 {
            count[ring.select(k, &idle)] += 1;
        }
        assert!(count.iter().all(|&c| c > 250 && c < 1000), "{count:?}");
        // A home at its cap is passed over; others keep theirs.
        let mut loads = [1usize; 8];
        loads[home] = 3; // cap = ⌈1.25 × 11 / 8⌉ = 2
        assert_ne!(ring.select(42, &loads), home);
        assert_eq!(ring.key_block(16, 100), Some(15));
        assert_eq!(ring.key_block(64, 2), Some(1));
        assert_eq!(ring.key_block(64, 0), None);
    }

    #[test]
    fn llmd_sums_weighted_scores_and_breaks_ties_at_random() {
        let s = LlmdScorers::default();
        let a = PeerRank {
            cached_blocks: 10,
            waiting: 4,
            kv_usage: 0.9,
            ..PeerRank::default()
        };
        let b = PeerRank {
            cached_blocks: 0,
            waiting: 0,
            kv_usage: 0.1,
            ..PeerRank::default()
        };
        // a: 3·1 + 2·0 + 2·0.1 = 3.2; b: 0 + 2·1 + 2·0.9 = 3.8.
        let sc = s.scores(10, &[a, b]);
        assert!(
            (sc[0] - 3.2).abs() < 1e-9 && (sc[1] - 3.8).abs() < 1e-9,
            "{sc:?}"
        );
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(s.select(10, &[a, b], &mut rng), 1);
        let mut seen = [false; 2];
        for _ in 0..64 {
            seen[s.select(10, &[b, b], &mut rng)] = true;
        }
        assert_eq!(seen, [true, true], "ties go either way");
    }
}
