//! Synthetic Mooncake-style traces with a chosen prefix-sharing structure,
//! for measuring routers beyond the one production trace.
//!
//! Every shape writes the trace format [`crate::trace`] reads: ms timestamps,
//! prompt and output lengths, and `hash_ids` of 512-token blocks where equal
//! ids mean equal content after an equal prefix. Arrivals are Poisson at
//! `rate` requests per second (sessions: session starts are Poisson, turns
//! follow after exponential think times), output lengths log-uniform in
//! [32, 800] tokens, and everything derives from one seed, so a shape, a size
//! and a seed name one trace exactly.
//!
//! - [`Shape::SmallFamilies`]: 2,000 families of 2–4 shared blocks, picked
//!   with Zipf(0.8) popularity, each request adding 1–3 blocks of its own. The
//!   shared prefixes alone outgrow a small fleet's cache: what matters is which
//!   families each worker keeps.
//! - [`Shape::LargeFamilies`]: 32 families of 24–40 shared blocks (12–20 k
//!   tokens), Zipf(1.0), 1–2 blocks of their own. The popular families are
//!   more work than one worker can do: what matters is spreading a family
//!   without caching it everywhere.
//! - [`Shape::Sessions`]: multi-turn chats, 3–15 turns each; a turn's prompt is
//!   the previous turn's prompt plus 1–3 new blocks, after one of 20 tenants'
//!   2-block system prompts; think time exponential with a 20 s mean. What
//!   matters is finding a session's worker again.

use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use serde::Serialize;

use crate::trace::TRACE_BLOCK_TOKENS;

/// A prefix-sharing structure (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Many small families.
    SmallFamilies,
    /// Few large families.
    LargeFamilies,
    /// Long multi-turn sessions.
    Sessions,
}

impl Shape {
    /// Every shape, by name.
    pub const ALL: [(Shape, &'static str); 3] = [
        (Shape::SmallFamilies, "small-families"),
        (Shape::LargeFamilies, "large-families"),
        (Shape::Sessions, "sessions"),
    ];
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(kvrouter_core::selection::choice_name(self, &Self::ALL))
    }
}

impl FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        kvrouter_core::selection::parse_choice(s, &Self::ALL, "shape")
    }
}

/// One line of a trace, as written.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SynthRequest {
    /// Arrival, ms.
    pub timestamp: u64,
    /// Prompt tokens.
    pub input_length: usize,
    /// Tokens to generate.
    pub output_length: usize,
    /// Prompt blocks.
    pub hash_ids: Vec<u64>,
}

/// Hands out fresh block ids.
struct Ids(u64);

impl Ids {
    fn take(&mut self, n: usize) -> Vec<u64> {
        let start = self.0;
        self.0 += n as u64;
        (start..self.0).collect()
    }
}

/// Zipf(s) over `n` ranks, by inverse CDF.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        Self(
            (1..=n)
                .map(|k| {
                    acc += 1.0 / (k as f64).powf(s);
                    acc
                })
                .collect(),
        )
    }
    fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        let u = rng.random::<f64>() * self.0.last().copied().unwrap_or(0.0);
        self.0.partition_point(|&c| c < u).min(self.0.len() - 1)
    }
}

fn exp_ms<R: Rng + ?Sized>(rng: &mut R, mean_ms: f64) -> f64 {
    -mean_ms * (1.0 - rng.random::<f64>()).ln()
}

fn output_len<R: Rng + ?Sized>(rng: &mut R) -> usize {
    let (lo, hi) = (32f64.ln(), 800f64.ln());
    (lo + (hi - lo) * rng.random::<f64>()).exp().round() as usize
}

/// A request whose prompt is `ids`; the last block is partly filled.
fn request<R: Rng + ?Sized>(rng: &mut R, t_ms: f64, ids: Vec<u64>) -> SynthRequest {
    let partial = rng.random_range(1..=TRACE_BLOCK_TOKENS);
    SynthRequest {
        timestamp: t_ms.round() as u64,
        input_length: (ids.len() - 1) * TRACE_BLOCK_TOKENS + partial,
        output_length: output_len(rng),
        hash_ids: ids,
    }
}

/// `requests` requests of `shape` at `rate` per second from `seed`, in arrival order.
pub fn generate(shape: Shape, requests: usize, rate: f64, seed: u64) -> Vec<SynthRequest> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids = Ids(0);
    let gap_ms = 1000.0 / rate;
    match shape {
        Shape::SmallFamilies | Shape::LargeFamilies => {
            let (families, blocks, own, s) = match shape {
                Shape::SmallFamilies => (2000, 2..=4, 1..=3, 0.8),
                _ => (32, 24..=40, 1..=2, 1.0),
            };
            let prefixes: Vec<Vec<u64>> = (0..families)
                .map(|_| {
                    let n = rng.random_range(blocks.clone());
                    ids.take(n)
                })
                .collect();
            let zipf = Zipf::new(families, s);
            let mut t = 0.0;
            (0..requests)
                .map(|_| {
                    t += exp_ms(&mut rng, gap_ms);
                    let mut prompt = prefixes[zipf.sample(&mut rng)].clone();
                    let n = rng.random_range(own.clone());
                    prompt.extend(ids.take(n));
                    request(&mut rng, t, prompt)
                })
                .collect()
        }
        Shape::Sessions => sessions(&mut rng, &mut ids, requests, gap_ms),
    }
}

fn sessions(rng: &mut StdRng, ids: &mut Ids, requests: usize, gap_ms: f64) -> Vec<SynthRequest> {
    const TENANTS: usize = 20;
    const MEAN_TURNS: f64 = 9.0;
    let systems: Vec<Vec<u64>> = (0..TENANTS).map(|_| ids.take(2)).collect();
    let mut out = Vec::with_capacity(requests + 16);
    // Sessions start at rate / mean turns, so requests arrive at about `rate`.
    let mut start = 0.0;
    while out.len() < requests + requests / 4 {
        start += exp_ms(rng, gap_ms * MEAN_TURNS);
        let mut prompt = systems[rng.random_range(0..TENANTS)].clone();
        let mut t = start;
        for _ in 0..rng.random_range(3..=15) {
            let n = rng.random_range(1..=3);
            prompt.extend(ids.take(n));
            out.push(request(rng, t, prompt.clone()));
            t += exp_ms(rng, 20_000.0);
        }
    }
    // Keep the earliest: late sessions' first turns would otherwise be missing.
    out.sort_by_key(|r| r.timestamp);
    out.truncate(requests);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_trace_and_lines_are_well_formed() {
        for (shape, _) in Shape::ALL {
            let a = generate(shape, 500, 10.0, 7);
            assert_eq!(a, generate(shape, 500, 10.0, 7), "{shape}");
            assert_ne!(a, generate(shape, 500, 10.0, 8), "{shape}");
            assert_eq!(a.len(), 500);
            for w in a.windows(2) {
                assert!(w[0].timestamp <= w[1].timestamp, "{shape}: arrival order");
            }
            for r in &a {
                assert_eq!(
                    r.input_length.div_ceil(TRACE_BLOCK_TOKENS),
                    r.hash_ids.len(),
                    "{shape}: one id per 512-token block"
                );
                assert!((32..=800).contains(&r.output_length));
            }
            // Roughly the asked rate: 500 requests at 10/s span ~50 s, plus
            // for sessions the ramp-up of one session's length (~3 min).
            let span = a.last().unwrap().timestamp as f64 / 1000.0;
            let most = if shape == Shape::Sessions {
                300.0
            } else {
                100.0
            };
            assert!((25.0..most).contains(&span), "{shape}: {span} s");
        }
    }

    #[test]
    fn shapes_share_what_they_promise() {
        let first = |t: &[SynthRequest], k: usize| -> std::collections::HashSet<Vec<u64>> {
            t.iter()
                .filter(|r| r.hash_ids.len() > k)
                .map(|r| r.hash_ids[..k].to_vec())
                .collect()
        };
        let small = generate(Shape::SmallFamilies, 2000, 10.0, 1);
        let large = generate(Shape::LargeFamilies, 2000, 10.0, 1);
        // Distinct 2-block prefixes: hundreds of small families, at most 32 large ones.
        assert!(first(&small, 2).len() > 500);
        assert!(first(&large, 2).len() <= 32);
        assert!(large.iter().all(|r| r.hash_ids.len() >= 25));
        // A session's later turn extends an earlier turn's prompt.
        let s = generate(Shape::Sessions, 2000, 10.0, 1);
        let extends = s.iter().filter(|r| {
            s.iter().any(|o| {
                o.hash_ids.len() < r.hash_ids.len()
                    && o.hash_ids.len() > 2
                    && r.hash_ids.starts_with(&o.hash_ids)
            })
        });
        assert!(extends.count() > 1000);
    }
}
