//! The `oracle` mode: the hit rate of one LRU cache pooling every worker's
//! capacity, requests served one after another. Any router's cached blocks
//! are a subset of what some worker holds, and every worker's cache is
//! bounded by its share of the pool under the same LRU rule, so no router
//! reuses more than this pooled cache would: a bound, not a router (it has no
//! latencies and no load balance).

use indicatif::ProgressBar;

use super::{SimConfig, SimMode, SimRequest};
use crate::blocks::BlockManager;
use crate::report::{ModeReport, Recorder};

/// The pooled-cache bound: one LRU cache of every worker's capacity.
pub(super) fn oracle(cfg: &SimConfig, reqs: &[SimRequest], progress: &ProgressBar) -> ModeReport {
    let bs = cfg.engine.block_size;
    let slots = cfg.workers * cfg.data_parallel_size.max(1);
    let mut cache = BlockManager::new(slots * cfg.engine.num_gpu_blocks, true);
    let mut rec = Recorder::new(SimMode::Oracle, reqs, slots);
    for (i, r) in reqs.iter().enumerate() {
        let names: Vec<u64> = r.seq.iter().map(|h| h.0).collect();
        let mut cached = cache.cached_prefix(&names);
        if cached * bs >= r.prompt_tokens {
            cached = (r.prompt_tokens - 1) / bs;
        }
        rec.oracle_hit(i, (cached * bs).min(r.prompt_tokens));
        // Use the request's blocks (prompt, then its unique output blocks), then release them.
        for h in &names[..cached] {
            cache.acquire(*h);
        }
        let total_blocks = (r.prompt_tokens + r.output_tokens).div_ceil(bs);
        let mut held: Vec<u64> = names[..cached].to_vec();
        for k in cached..total_blocks {
            if !cache.allocate_partial() {
                break;
            }
            let name = names
                .get(k)
                .copied()
                .unwrap_or(((i as u64) << 24) ^ (k as u64) ^ 0x5eed_0000_0000_0000);
            cache.promote(name);
            held.push(name);
        }
        for h in held.iter().rev() {
            cache.release(*h);
        }
        cache.take_events();
        progress.inc(1);
    }
    rec.finish(0)
}
