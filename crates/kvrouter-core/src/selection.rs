//! Worker selection: from per-worker overlap and load to one decision.
//!
//! The KV cost of sending a request to worker `w` is the reference's classic
//! `W · prefill_blocks_w + decode_blocks_w` (lower wins), where
//! `prefill_blocks_w = (queued prefill tokens + this request's uncached tokens)
//! / block_size` and `decode_blocks_w` counts the blocks `w` would hold. At
//! temperature 0 the cheapest worker wins, ties going to the worker whose
//! cache index is smallest, then to a uniformly random one; above 0 a worker
//! is sampled with probability `softmax(−(cost − min) / ((max − min) · T))`.
//! Selection only decides: it returns a [`Decision`] with the cost breakdown
//! and mutates nothing; the caller commits it. Randomness is injected.

use std::fmt;
use std::str::FromStr;

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::protocols::WorkerKey;

/// How the frontend picks a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum RouterMode {
    /// Each worker in turn.
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// KV-cache-aware: overlap against prefill and decode load.
    Kv,
    /// KV-cache-aware, prefix families kept on one worker within a load bound.
    KvSticky,
}

impl RouterMode {
    /// Every mode, by its flag spelling.
    pub const ALL: [(RouterMode, &'static str); 4] = [
        (RouterMode::RoundRobin, "round-robin"),
        (RouterMode::Random, "random"),
        (RouterMode::Kv, "kv"),
        (RouterMode::KvSticky, "kv-sticky"),
    ];

    /// Whether it follows the KV index and the active sequences.
    pub fn kv_aware(self) -> bool {
        matches!(self, RouterMode::Kv | RouterMode::KvSticky)
    }

    /// The flag spelling (`round-robin`).
    pub fn as_str(self) -> &'static str {
        choice_name(&self, &Self::ALL)
    }
}

/// The name of `value` in a `(value, name)` table.
pub fn choice_name<T: PartialEq>(value: &T, table: &[(T, &'static str)]) -> &'static str {
    table
        .iter()
        .find(|(v, _)| v == value)
        .map_or("?", |(_, n)| n)
}

/// Parses one of a table's names: case-insensitive, `_` read as `-` (the
/// reference spells some defaults `round_robin`).
pub fn parse_choice<T: Copy>(
    s: &str,
    table: &[(T, &'static str)],
    what: &str,
) -> Result<T, String> {
    let norm = s.trim().to_ascii_lowercase().replace('_', "-");
    table
        .iter()
        .find(|(_, n)| *n == norm)
        .map(|(v, _)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = table.iter().map(|(_, n)| *n).collect();
            format!("unknown {what} {s:?} (expected {})", names.join(", "))
        })
}

impl fmt::Display for RouterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(choice_name(self, &Self::ALL))
    }
}

impl FromStr for RouterMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_choice(s, &Self::ALL, "router mode")
    }
}

/// A worker rank the request could go to, with what the router knows of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The rank.
    pub worker: WorkerKey,
    /// Leading blocks of the prompt it caches.
    pub overlap_blocks: u32,
    /// Blocks its index entry holds (the tie-breaker).
    pub tree_size: usize,
    /// Prefill tokens it would have queued with this request.
    pub prefill_tokens: usize,
    /// Decode blocks it would hold with this request.
    pub decode_blocks: usize,
}

/// The request, as selection sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteRequest {
    /// Prompt length in tokens (> 0).
    pub isl_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Weight of prefill blocks in the cost.
    pub overlap_score_weight: f64,
    /// Softmax temperature (0: lowest cost).
    pub temperature: f64,
}

/// What selection decided, and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// The chosen rank.
    pub worker: WorkerKey,
    /// Its cached prefix, in blocks.
    pub overlap_blocks: u32,
    /// `prefill_tokens / block_size` of the chosen rank.
    pub prefill_blocks: f64,
    /// Decode blocks of the chosen rank.
    pub decode_blocks: f64,
    /// `W · prefill_blocks + decode_blocks`.
    pub cost: f64,
    /// Blocks the request needs: `ceil(isl / block_size)`.
    pub required_blocks: usize,
    /// Ranks that tied for the lowest cost (1 when the choice was clear).
    pub tied: usize,
}

/// Why no worker could be selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    /// No worker is registered.
    #[error("no workers available")]
    NoWorkers,
    /// Every worker is over a busy threshold.
    #[error("all workers are busy")]
    AllWorkersBusy,
    /// The prompt is empty.
    #[error("the prompt has no tokens")]
    EmptyPrompt,
}

/// The cost of one candidate: (prefill blocks, decode blocks, cost).
#[inline]
pub fn cost(req: &RouteRequest, c: &Candidate) -> (f64, f64, f64) {
    let prefill = c.prefill_tokens as f64 / req.block_size as f64;
    let decode = c.decode_blocks as f64;
    (prefill, decode, req.overlap_score_weight * prefill + decode)
}

/// Picks a worker by KV cost (see the module docs).
pub fn select_kv<R: Rng + ?Sized>(
    req: &RouteRequest,
    candidates: &[Candidate],
    rng: &mut R,
) -> Result<Decision, SelectionError> {
    if req.isl_tokens == 0 {
        return Err(SelectionError::EmptyPrompt);
    }
    if candidates.is_empty() {
        return Err(SelectionError::NoWorkers);
    }
    // Each cost once: selection is O(workers) and runs on every request.
    let costs: SmallVec<[f64; 64]> = candidates.iter().map(|c| cost(req, c).2).collect();
    let (min, max) = costs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let (index, tied) = if req.temperature > 0.0 && max > min {
        (softmax_pick(req.temperature, &costs, min, max, rng), 1)
    } else if req.temperature > 0.0 {
        (rng.random_range(0..candidates.len()), candidates.len())
    } else {
        lowest(candidates, &costs, min, rng)
    };
    Ok(Decision::of(req, &candidates[index], tied))
}

impl Decision {
    /// The decision to send `req` to `c`, with its cost broken down.
    pub fn of(req: &RouteRequest, c: &Candidate, tied: usize) -> Self {
        let (prefill_blocks, decode_blocks, cost) = cost(req, c);
        Decision {
            worker: c.worker,
            overlap_blocks: c.overlap_blocks,
            prefill_blocks,
            decode_blocks,
            cost,
            required_blocks: req.isl_tokens.div_ceil(req.block_size),
            tied,
        }
    }
}

/// The cheapest candidates; among them the smallest tree, then uniformly.
fn lowest<R: Rng + ?Sized>(
    candidates: &[Candidate],
    costs: &[f64],
    min: f64,
    rng: &mut R,
) -> (usize, usize) {
    let mut best_tree = usize::MAX;
    let mut ties = 0usize;
    let mut chosen = 0usize;
    let mut at_min = 0usize;
    for (i, c) in candidates.iter().enumerate() {
        if costs[i] != min {
            continue;
        }
        at_min += 1;
        if c.tree_size < best_tree {
            best_tree = c.tree_size;
            ties = 1;
            chosen = i;
        } else if c.tree_size == best_tree {
            // Reservoir sampling: each tied candidate kept with probability 1/ties.
            ties += 1;
            if rng.random_range(0..ties) == 0 {
                chosen = i;
            }
        }
    }
    (chosen, at_min)
}

fn softmax_pick<R: Rng + ?Sized>(
    temperature: f64,
    costs: &[f64],
    min: f64,
    max: f64,
    rng: &mut R,
) -> usize {
    let range = max - min;
    // Costs are normalised by their range, so T means the same at any load level.
    let weights: SmallVec<[f64; 64]> = costs
        .iter()
        .map(|&v| (-(v - min) / (range * temperature)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let u: f64 = rng.random::<f64>() * total;
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if acc >= u {
            return i;
        }
    }
    costs.len() - 1
}

/// Drops candidates whose worker is busy.
///
/// `NoWorkers` when there are none at all, `AllWorkersBusy` when every one is busy.
pub fn without_busy(
    candidates: Vec<Candidate>,
    busy: &std::collections::HashSet<crate::protocols::WorkerId>,
) -> Result<Vec<Candidate>, SelectionError> {
    if candidates.is_empty() {
        return Err(SelectionError::NoWorkers);
    }
    if busy.is_empty() {
        return Ok(candidates);
    }
    let free: Vec<Candidate> = candidates
        .into_iter()
        .filter(|c| !busy.contains(&c.worker.worker_id))
        .collect();
    if free.is_empty() {
        Err(SelectionError::AllWorkersBusy)
    } else {
        Ok(free)
    }
}

/// Round-robin over `n` workers with an external counter.
pub fn select_round_robin(counter: &mut usize, n: usize) -> Result<usize, SelectionError> {
    if n == 0 {
        return Err(SelectionError::NoWorkers);
    }
    let i = *counter % n;
    *counter = counter.wrapping_add(1);
    Ok(i)
}

/// A uniformly random worker index.
pub fn select_random<R: Rng + ?Sized>(n: usize, rng: &mut R) -> Result<usize, SelectionError> {
    if n == 0 {
        return Err(SelectionError::NoWorkers);
    }
    Ok(rng.random_range(0..n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn cand(id: u64, prefill_blocks: usize, decode: usize, tree: usize) -> Candidate {
        Candidate {
            worker: WorkerKey::new(id, 0),
            overlap_blocks: 0,
            tree_size: tree,
            prefill_tokens: prefill_blocks * 16,
            decode_blocks: decode,
        }
    }

    fn req(w: f64, t: f64) -> RouteRequest {
        RouteRequest {
            isl_tokens: 100,
            block_size: 16,
            overlap_score_weight: w,
            temperature: t,
        }
    }

    #[test]
    fn reference_worked_example() {
        // W=1: worker1 8+10=18, worker2 5+5=10 (chosen), worker3 2+9=11.
        let cs = [cand(1, 8, 10, 0), cand(2, 5, 5, 0), cand(3, 2, 9, 0)];
        let d = select_kv(&req(1.0, 0.0), &cs, &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(d.worker.worker_id, 2);
        assert_eq!(
            (d.prefill_blocks, d.decode_blocks, d.cost),
            (5.0, 5.0, 10.0)
        );
        assert_eq!(d.required_blocks, 7);
        // A higher weight favours the worker with the least prefill.
        let d = select_kv(&req(3.0, 0.0), &cs, &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(d.worker.worker_id, 3);
    }

    #[test]
    fn ties_go_to_the_smallest_tree_then_random() {
        let cs = [
            cand(1, 1, 1, 50),
            cand(2, 1, 1, 10),
            cand(3, 1, 1, 10),
            cand(4, 9, 9, 0),
        ];
        let mut seen = std::collections::HashSet::new();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let d = select_kv(&req(1.0, 0.0), &cs, &mut rng).unwrap();
            assert_eq!(d.tied, 3);
            seen.insert(d.worker.worker_id);
        }
        assert_eq!(seen, [2, 3].into_iter().collect());
    }

    #[test]
    fn temperature_spreads_choices_by_cost() {
        let cs = [cand(1, 0, 0, 0), cand(2, 1, 0, 0), cand(3, 10, 0, 0)];
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[select_kv(&req(1.0, 0.5), &cs, &mut rng)
                .unwrap()
                .worker
                .worker_id as usize] += 1;
        }
        // weights exp(0), exp(-0.2), exp(-2): 1, 0.82, 0.14 of 1.95
        assert!(
            counts[1] > counts[2] && counts[2] > counts[3] && counts[3] > 100,
            "{counts:?}"
        );
        // Equal costs at T > 0: uniform.
        let eq = [cand(1, 1, 1, 0), cand(2, 1, 1, 0)];
        let d = select_kv(&req(1.0, 1.0), &eq, &mut rng).unwrap();
        assert_eq!(d.tied, 2);
    }

    #[test]
    fn errors() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(
            select_kv(&req(1.0, 0.0), &[], &mut rng),
            Err(SelectionError::NoWorkers)
        );
        let empty = RouteRequest {
            isl_tokens: 0,
            ..req(1.0, 0.0)
        };
        assert_eq!(
            select_kv(&empty, &[cand(1, 0, 0, 0)], &mut rng),
            Err(SelectionError::EmptyPrompt)
        );
        assert_eq!(
            select_round_robin(&mut 0, 0),
            Err(SelectionError::NoWorkers)
        );
        assert_eq!(select_random(0, &mut rng), Err(SelectionError::NoWorkers));
    }

    #[test]
    fn round_robin_and_modes() {
        let mut c = 0;
        let picks: Vec<_> = (0..5)
            .map(|_| select_round_robin(&mut c, 3).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1]);
        assert_eq!("kv".parse::<RouterMode>(), Ok(RouterMode::Kv));
        assert_eq!("kv-sticky".parse::<RouterMode>(), Ok(RouterMode::KvSticky));
        assert!(RouterMode::KvSticky.kv_aware() && !RouterMode::RoundRobin.kv_aware());
        assert_eq!(
            "round_robin".parse::<RouterMode>(),
            Ok(RouterMode::RoundRobin)
        );
        assert!("fastest".parse::<RouterMode>().is_err());
        assert_eq!(RouterMode::Random.to_string(), "random");
        assert_eq!(RouterMode::default(), RouterMode::RoundRobin);
    }

    proptest! {
        #[test]
        fn never_picks_a_busy_worker(
            loads in proptest::collection::vec((0usize..50, 0usize..50), 1..30),
            busy in proptest::collection::hash_set(0u64..30, 0..30),
            t in 0.0f64..2.0, seed in any::<u64>(),
        ) {
            let cs: Vec<_> = loads.iter().enumerate().map(|(i, &(p, d))| cand(i as u64, p, d, 0)).collect();
            let n = cs.len();
            match without_busy(cs, &busy) {
                Ok(free) => {
                    let d = select_kv(&req(1.0, t), &free, &mut StdRng::seed_from_u64(seed)).unwrap();
                    prop_assert!(!busy.contains(&d.worker.worker_id));
                }
                Err(e) => {
                    prop_assert_eq!(e, SelectionError::AllWorkersBusy);
                    prop_assert!((0..n as u64).all(|w| busy.contains(&w)));
                }
            }
        }

        #[test]
        fn temperature_zero_always_picks_a_minimum(
            loads in proptest::collection::vec((0usize..50, 0usize..50, 0usize..5), 1..40),
            w in 0.0f64..4.0, seed in any::<u64>(),
        ) {
            let cs: Vec<_> = loads.iter().enumerate().map(|(i, &(p, d, t))| cand(i as u64, p, d, t)).collect();
            let r = req(w, 0.0);
            let d = select_kv(&r, &cs, &mut StdRng::seed_from_u64(seed)).unwrap();
            let min = cs.iter().map(|c| cost(&r, c).2).fold(f64::INFINITY, f64::min);
            prop_assert_eq!(d.cost, min);
            let min_tree = cs.iter().filter(|c| cost(&r, c).2 == min).map(|c| c.tree_size).min().unwrap();
            let chosen = cs.iter().find(|c| c.worker == d.worker).unwrap();
            prop_assert_eq!(chosen.tree_size, min_tree);
        }
    }
}
