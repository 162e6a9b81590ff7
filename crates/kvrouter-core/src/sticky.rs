//! `kv-sticky`: keep each prefix family on one rank while that rank's load
//! stays within a bound of the mean, instead of trading cached blocks for
//! load one request at a time as the `kv` cost does.
//!
//! With the reference cost `W · prefill_blocks + decode_blocks`, a rank that
//! caches a family's prefix loses the family's next request as soon as its
//! decode load exceeds another rank's by more than the prefill it would save,
//! and the family is then cached twice: N caches fill like N small ones. This
//! policy asks two questions in order:
//!
//! 1. **Which ranks may take it?** Rank `i`, caching `overlap_i` of the
//!    request's `required` blocks, if its KV cost with the request added is at
//!    most `(1 + spill + stake · overlap_i / required) · mean cost + required`
//!    over the candidates. The bound grows with what is at stake: a rank
//!    holding most of a long session may run further above the mean than one
//!    holding only a system prompt every rank has, so a session stays put
//!    through a burst while a request with little to lose is placed by load.
//! 2. **Which of them?** The one caching the longest prefix (ties: lower cost,
//!    then smaller tree). When none caches any of it — a new family, or one
//!    whose blocks were evicted everywhere — its *home*: the rank that
//!    rendezvous-hashes highest with the prompt's first block, so a family's
//!    requests meet on one rank and the fleet's caches partition the families
//!    instead of each churning through all of them.
//!
//! If the bound excludes every rank (it cannot: the cheapest is always within
//! it) the cheapest is taken.

use crate::fast_hash::mix64;
use crate::selection::{Candidate, Decision, RouteRequest, SelectionError, cost};

/// Default `spill`: a rank may run 5% above the mean cost (plus one request).
pub const DEFAULT_SPILL: f64 = 0.05;
/// Default `stake`: a rank caching the whole prompt may run 30% further.
pub const DEFAULT_STAKE: f64 = 0.3;

/// Picks a rank by the sticky policy (see the module docs); `home` is the
/// family key (the prompt's first block hash).
pub fn select_sticky(
    req: &RouteRequest,
    candidates: &[Candidate],
    home: u64,
    spill: f64,
    stake: f64,
) -> Result<Decision, SelectionError> {
    if req.isl_tokens == 0 {
        return Err(SelectionError::EmptyPrompt);
    }
    if candidates.is_empty() {
        return Err(SelectionError::NoWorkers);
    }
    let required = req.isl_tokens.div_ceil(req.block_size);
    let costs: Vec<f64> = candidates.iter().map(|c| cost(req, c).2).collect();
    let mean = costs.iter().sum::<f64>() / costs.len() as f64;
    let mut best: Option<usize> = None;
    for (i, c) in candidates.iter().enumerate() {
        let share = f64::from(c.overlap_blocks) / required as f64;
        let bound = (1.0 + spill + stake * share.min(1.0)) * mean + required as f64;
        if costs[i] > bound {
            continue;
        }
        let better = match best {
            None => true,
            Some(b) => {
                let o = &candidates[b];
                if c.overlap_blocks != o.overlap_blocks {
                    c.overlap_blocks > o.overlap_blocks
                } else if c.overlap_blocks == 0 {
                    rendezvous(home, c) > rendezvous(home, o)
                } else if costs[i] != costs[b] {
                    costs[i] < costs[b]
                } else {
                    c.tree_size < o.tree_size
                }
            }
        };
        if better {
            best = Some(i);
        }
    }
    let i = best.unwrap_or_else(|| {
        // Unreachable in exact arithmetic (the cheapest is below the mean);
        // kept so a NaN cost cannot leave the request unrouted.
        (0..costs.len())
            .min_by(|&a, &b| costs[a].total_cmp(&costs[b]))
            .unwrap_or(0)
    });
    Ok(Decision::of(req, &candidates[i], 1))
}

/// The weight of rank `c` for family `home` (highest wins).
fn rendezvous(home: u64, c: &Candidate) -> u64 {
    let k = c.worker;
    mix64(home ^ k.worker_id.rotate_left(17) ^ u64::from(k.dp_rank).rotate_left(41))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::WorkerKey;

    fn cand(id: u64, overlap: u32, prefill_tokens: usize, decode_blocks: usize) -> Candidate {
        Candidate {
            worker: WorkerKey::new(id, 0),
            overlap_blocks: overlap,
            tree_size: 0,
            prefill_tokens,
            decode_blocks,
        }
    }

    const REQ: RouteRequest = RouteRequest {
        isl_tokens: 64,
        block_size: 16,
        overlap_score_weight: 1.0,
        temperature: 0.0,
    };

    #[test]
    fn stays_with_the_cache_while_within_the_bound() {
        // Worker 1 caches 3 of 4 blocks but carries 20 more decode blocks than
        // worker 2: the kv cost leaves it, the sticky policy does not.
        let cs = [cand(1, 3, 16, 120), cand(2, 0, 64, 100)];
        let kv = crate::selection::select_kv(
            &REQ,
            &cs,
            &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0),
        )
        .unwrap();
        assert_eq!(kv.worker.worker_id, 2);
        let d = select_sticky(&REQ, &cs, 7, DEFAULT_SPILL, DEFAULT_STAKE).unwrap();
        assert_eq!((d.worker.worker_id, d.overlap_blocks), (1, 3));
        // Far above the mean it spills to the lighter rank.
        let cs = [cand(1, 3, 16, 900), cand(2, 0, 64, 100)];
        assert_eq!(
            select_sticky(&REQ, &cs, 7, DEFAULT_SPILL, DEFAULT_STAKE)
                .unwrap()
                .worker
                .worker_id,
            2
        );
    }

    #[test]
    fn the_stake_widens_the_bound() {
        // Worker 1 holds 3 of 4 blocks at cost 61 (1 prefill block + 60
        // decode); worker 2 holds none at cost 44: mean 52.5, spill-only
        // bound 1.05 × 52.5 + 4 = 59.1.
        let cs = [cand(1, 3, 16, 60), cand(2, 0, 64, 40)];
        let pick = |stake| {
            select_sticky(&REQ, &cs, 7, DEFAULT_SPILL, stake)
                .unwrap()
                .worker
                .worker_id
        };
        assert_eq!(pick(0.0), 2);
        // With the stake, 3/4 of the prompt buys 0.3 × 0.75 more: bound 70.9.
        assert_eq!(pick(DEFAULT_STAKE), 1);
    }

    #[test]
    fn a_family_nobody_caches_goes_home_and_homes_are_spread() {
        let cs: Vec<Candidate> = (1..=8).map(|id| cand(id, 0, 64, 10)).collect();
        let home_of = |h: u64| {
            select_sticky(&REQ, &cs, h, DEFAULT_SPILL, DEFAULT_STAKE)
                .unwrap()
                .worker
        };
        // Stable: the same family, the same home.
        assert_eq!(home_of(42), home_of(42));
        let homes: std::collections::HashSet<_> = (0..200u64).map(home_of).collect();
        assert_eq!(homes.len(), 8, "200 families use every rank");
        // Removing a rank that is not a family's home leaves it where it was.
        let h = home_of(42);
        let fewer: Vec<Candidate> = cs.iter().copied().filter(|c| c.worker != h).collect();
        let moved = select_sticky(&REQ, &fewer, 42, DEFAULT_SPILL, DEFAULT_STAKE)
            .unwrap()
            .worker;
        assert_ne!(moved, h);
        let other = cs
            .iter()
            .find(|c| c.worker != h && c.worker != moved)
            .unwrap()
            .worker;
        let without_other: Vec<Candidate> =
            cs.iter().copied().filter(|c| c.worker != other).collect();
        assert_eq!(
            select_sticky(&REQ, &without_other, 42, DEFAULT_SPILL, DEFAULT_STAKE)
                .unwrap()
                .worker,
            h
        );
    }

    #[test]
    fn rejects_what_kv_rejects() {
        let empty = RouteRequest {
            isl_tokens: 0,
            ..REQ
        };
        assert_eq!(
            select_sticky(&empty, &[cand(1, 0, 0, 0)], 0, 0.25, 0.3),
            Err(SelectionError::EmptyPrompt)
        );
        assert_eq!(
            select_sticky(&REQ, &[], 0, 0.25, 0.3),
            Err(SelectionError::NoWorkers)
        );
    }
}
