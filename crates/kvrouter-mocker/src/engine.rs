//! One simulated engine rank: continuous batching over a paged KV cache.
//!
//! The caller drives it in passes: [`Engine::plan_step`] schedules a batch and
//! says how long it takes; [`Engine::finish_step`] applies it at that time and
//! returns the tokens produced and the KV events published. Scheduling follows
//! vLLM's shape: running requests first (one token each when decoding, a chunk
//! of the prompt when prefilling), then waiting ones in arrival order while
//! `max_num_seqs`, the `max_num_batched_tokens` budget and the free-block
//! watermark allow. A request starts from its longest cached prefix. When a
//! running request needs a block and none can be freed, the newest running
//! request is preempted: its blocks are released and it recomputes later.

use std::collections::VecDeque;

use kvrouter_core::hash::SequenceHash;
use kvrouter_core::protocols::{
    ActiveLoad, ForwardPassMetrics, KvCacheEvent, KvStats, WorkerStats,
};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::blocks::{BlockManager, FullBlock};
use crate::perf;

/// Engine settings (the mocker's flags).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    /// KV blocks per rank (`--num-gpu-blocks`).
    pub num_gpu_blocks: usize,
    /// Tokens per block (`--block-size`).
    pub block_size: usize,
    /// Running requests at most (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Tokens per pass at most (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Reuse cached prefixes (`--enable-prefix-caching`).
    pub enable_prefix_caching: bool,
    /// Split prompts over passes (`--enable-chunked-prefill`).
    pub enable_chunked_prefill: bool,
    /// Fraction of blocks kept free at admission (`--watermark`).
    pub watermark: f64,
    /// Durations are divided by this (`--speedup-ratio`).
    pub speedup_ratio: f64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            num_gpu_blocks: 16384,
            block_size: 64,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            watermark: 0.01,
            speedup_ratio: 1.0,
        }
    }
}

/// A request as the engine sees it: prompt length and its full blocks' hashes.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    /// Unique id.
    pub id: u64,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// The prompt's full blocks, root first (`prompt_tokens / block_size` of them).
    pub prompt_blocks: Vec<FullBlock>,
    /// Tokens to generate (at least 1).
    pub max_tokens: usize,
}

/// A token produced in a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenOutput {
    /// The request.
    pub request: u64,
    /// Tokens generated so far, this one included.
    pub generated: usize,
    /// The request is complete.
    pub finished: bool,
    /// Prompt tokens served from cache when the request was first admitted.
    pub cached_tokens: usize,
}

/// What a finished pass produced.
#[derive(Debug, Default)]
pub struct StepResult {
    /// One token per request that sampled one.
    pub tokens: Vec<TokenOutput>,
    /// KV events, in order, numbered for this rank.
    pub events: Vec<KvCacheEvent>,
    /// Requests that were preempted while planning this pass.
    pub preempted: usize,
}

#[derive(Debug)]
struct Seq {
    req: EngineRequest,
    /// Names of the context's full blocks (prompt, then generated ones).
    hashes: Vec<FullBlock>,
    computed: usize,
    generated: usize,
    /// Leading blocks held as full blocks.
    held_full: usize,
    /// Slots held for blocks still being filled.
    partials: usize,
    scheduled: usize,
    cached_tokens: Option<usize>,
}

impl Seq {
    /// Tokens whose KV must exist before the next token can be sampled.
    fn context_needed(&self) -> usize {
        self.req.prompt_tokens + self.generated.saturating_sub(1)
    }

    fn in_prefill(&self) -> bool {
        self.computed < self.context_needed()
    }

    /// Name of block `k`, deriving generated blocks' names as they fill.
    fn block_name(&mut self, k: usize) -> FullBlock {
        while self.hashes.len() <= k {
            let i = self.hashes.len() as u64;
            let local = xxh3_64_with_seed(&i.to_le_bytes(), self.req.id ^ 0x6b76_726f_7574_6572);
            let seq = match self.hashes.last() {
                None => local,
                Some(prev) => {
                    let mut buf = [0u8; 16];
                    buf[..8].copy_from_slice(&prev.seq.to_le_bytes());
                    buf[8..].copy_from_slice(&local.to_le_bytes());
                    kvrouter_core::hash::compute_hash(&buf)
                }
            };
            self.hashes.push(FullBlock { seq, local });
        }
        self.hashes[k]
    }
}

/// One engine rank.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    worker_id: u64,
    dp_rank: u32,
    blocks: BlockManager,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    next_event_id: u64,
    planned: bool,
    preempted: usize,
    prompt_tokens_seen: u64,
    prompt_tokens_cached: u64,
}

impl Engine {
    /// An idle engine rank.
    pub fn new(cfg: EngineConfig, worker_id: u64, dp_rank: u32) -> Self {
        Self {
            cfg,
            worker_id,
            dp_rank,
            blocks: BlockManager::new(cfg.num_gpu_blocks, cfg.enable_prefix_caching),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_event_id: 0,
            planned: false,
            preempted: 0,
            prompt_tokens_seen: 0,
            prompt_tokens_cached: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The KV cache (read-only).
    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// Queues a request.
    pub fn add_request(&mut self, req: EngineRequest) {
        let hashes = req.prompt_blocks.clone();
        self.waiting.push_back(Seq {
            req,
            hashes,
            computed: 0,
            generated: 0,
            held_full: 0,
            partials: 0,
            scheduled: 0,
            cached_tokens: None,
        });
    }

    /// Drops a request (the caller went away); `false` if it is not here.
    ///
    /// Its blocks are released to the prefix cache, as an engine's abort does.
    pub fn abort(&mut self, id: u64) -> bool {
        assert!(!self.planned, "abort between passes only");
        if let Some(i) = self.waiting.iter().position(|s| s.req.id == id) {
            let seq = self.waiting.remove(i).expect("position is in range");
            self.release_all(seq);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.req.id == id) {
            let seq = self.running.remove(i);
            self.release_all(seq);
            return true;
        }
        false
    }

    /// Receives a prompt's KV from a prefill worker (disaggregated serving):
    /// its full blocks enter the prefix cache as if computed here, published as
    /// stored, so the request that follows prefills only its last token.
    /// Stops early when the cache is full; returns the blocks now cached.
    pub fn import_blocks(&mut self, blocks: &[FullBlock]) -> usize {
        assert!(!self.planned, "import between passes only");
        let names: Vec<u64> = blocks.iter().map(|b| b.seq).collect();
        let cached = self.blocks.cached_prefix(&names);
        let mut held: Vec<u64> = names[..cached].to_vec();
        for h in &held {
            self.blocks.acquire(*h);
        }
        let mut parent = cached.checked_sub(1).map(|i| names[i]);
        let mut chain: Vec<FullBlock> = Vec::new();
        for b in &blocks[cached..] {
            if !self.blocks.allocate_partial() {
                break;
            }
            if self.blocks.promote(b.seq) {
                chain.push(*b);
            } else {
                self.blocks.record_stored(parent, &chain);
                chain.clear();
                parent = Some(b.seq);
            }
            held.push(b.seq);
        }
        self.blocks.record_stored(parent, &chain);
        for h in held.iter().rev() {
            self.blocks.release(*h);
        }
        held.len()
    }

    /// Whether any request is queued or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Requests queued, and running.
    pub fn queue_depth(&self) -> (usize, usize) {
        (self.waiting.len(), self.running.len())
    }

    /// Schedules the next pass; returns its duration in ms, or `None` when idle.
    pub fn plan_step(&mut self) -> Option<f64> {
        assert!(!self.planned, "finish the planned pass first");
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut prefill_tokens = 0usize;
        let mut decoding = 0usize;
        // Running requests, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let need = if seq.in_prefill() {
                seq.context_needed() - seq.computed
            } else {
                1
            };
            let take = if self.cfg.enable_chunked_prefill {
                need.min(budget)
            } else if need <= budget || budget == self.cfg.max_num_batched_tokens {
                need
            } else {
                i += 1;
                continue;
            };
            if !self.reserve(i, take) {
                // `reserve` preempted from the back; this request may be gone.
                if i >= self.running.len() {
                    break;
                }
                continue;
            }
            let seq = &mut self.running[i];
            if seq.in_prefill() {
                prefill_tokens += take;
            } else {
                decoding += 1;
            }
            seq.scheduled = take;
            budget = budget.saturating_sub(take);
            i += 1;
        }
        // Waiting requests, in arrival order.
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(take) = self.admit_front(budget) else {
                break;
            };
            prefill_tokens += take;
            budget = budget.saturating_sub(take);
        }
        if prefill_tokens == 0 && decoding == 0 {
            return None;
        }
        self.planned = true;
        let usage = self.blocks.active_slots() as f64 / self.cfg.num_gpu_blocks.max(1) as f64;
        Some(perf::step_ms(
            prefill_tokens,
            decoding,
            usage,
            self.cfg.speedup_ratio,
        ))
    }

    /// Applies the planned pass: KV computed, blocks filled, tokens sampled.
    pub fn finish_step(&mut self) -> StepResult {
        assert!(self.planned, "no pass planned");
        self.planned = false;
        let bs = self.cfg.block_size;
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let seq = &mut self.running[i];
            if seq.scheduled == 0 {
                i += 1;
                continue;
            }
            seq.computed += seq.scheduled;
            seq.scheduled = 0;
            // Name the blocks that just filled; publish the new ones as chains.
            let mut chain: Vec<FullBlock> = Vec::new();
            let mut parent = (seq.held_full > 0).then(|| seq.hashes[seq.held_full - 1].seq);
            while seq.held_full < seq.computed / bs {
                let k = seq.held_full;
                let name = seq.block_name(k);
                seq.partials -= 1;
                seq.held_full += 1;
                if self.blocks.promote(name.seq) {
                    chain.push(name);
                } else {
                    self.blocks.record_stored(parent, &chain);
                    chain.clear();
                    parent = Some(name.seq);
                }
            }
            self.blocks.record_stored(parent, &chain);
            if seq.computed < seq.context_needed() {
                i += 1;
                continue; // still prefilling
            }
            seq.generated += 1;
            let finished = seq.generated >= seq.req.max_tokens.max(1);
            tokens.push(TokenOutput {
                request: seq.req.id,
                generated: seq.generated,
                finished,
                cached_tokens: seq.cached_tokens.unwrap_or(0),
            });
            if finished {
                let seq = self.running.remove(i);
                self.release_all(seq);
            } else {
                i += 1;
            }
        }
        let events = self
            .blocks
            .take_events()
            .into_iter()
            .map(|data| {
                let event_id = self.next_event_id;
                self.next_event_id += 1;
                KvCacheEvent {
                    event_id,
                    data,
                    dp_rank: self.dp_rank,
                }
            })
            .collect();
        StepResult {
            tokens,
            events,
            preempted: std::mem::take(&mut self.preempted),
        }
    }

    /// The rank's load, as published on `kv_metrics`.
    pub fn active_load(&self) -> ActiveLoad {
        let prefill: usize = self
            .running
            .iter()
            .chain(self.waiting.iter())
            .map(|s| s.context_needed().saturating_sub(s.computed))
            .sum();
        ActiveLoad {
            worker_id: self.worker_id,
            dp_rank: self.dp_rank,
            active_decode_blocks: None,
            active_prefill_tokens: Some(prefill as u64),
            kv_used_blocks: Some(self.blocks.active_slots() as u64),
        }
    }

    /// Engine metrics (`ForwardPassMetrics`).
    pub fn metrics(&self) -> ForwardPassMetrics {
        let total = self.cfg.num_gpu_blocks as u64;
        let active = self.blocks.active_slots() as u64;
        ForwardPassMetrics {
            worker_stats: WorkerStats {
                data_parallel_rank: Some(self.dp_rank),
                request_active_slots: self.running.len() as u64,
                request_total_slots: self.cfg.max_num_seqs as u64,
                num_requests_waiting: self.waiting.len() as u64,
            },
            kv_stats: KvStats {
                kv_active_blocks: active,
                kv_total_blocks: total,
                gpu_cache_usage_perc: active as f32 / total.max(1) as f32,
                gpu_prefix_cache_hit_rate: self.prompt_tokens_cached as f32
                    / self.prompt_tokens_seen.max(1) as f32,
            },
        }
    }

    /// Prompt tokens looked up in the prefix cache so far, and those found.
    pub fn prefix_cache_tokens(&self) -> (u64, u64) {
        (self.prompt_tokens_seen, self.prompt_tokens_cached)
    }

    /// Sequence hashes of the blocks a request would find cached here.
    pub fn cached_prefix_blocks(&self, blocks: &[SequenceHash]) -> usize {
        let names: Vec<u64> = blocks.iter().map(|h| h.0).collect();
        self.blocks.cached_prefix(&names)
    }

    /// Admits the first waiting request if it fits; returns the tokens scheduled.
    fn admit_front(&mut self, budget: usize) -> Option<usize> {
        let bs = self.cfg.block_size;
        let seq = self.waiting.front_mut()?;
        let ctx = seq.context_needed();
        let known = ctx / bs;
        let names: Vec<u64> = (0..known).map(|k| seq.block_name(k).seq).collect();
        let mut cached = self.blocks.cached_prefix(&names);
        // Always compute at least one token, to sample from.
        if cached * bs >= ctx {
            cached = (ctx - 1) / bs;
        }
        let remaining = ctx - cached * bs;
        let take = if self.cfg.enable_chunked_prefill {
            remaining.min(budget)
        } else if remaining <= budget || budget == self.cfg.max_num_batched_tokens {
            remaining
        } else {
            return None;
        };
        let new_slots = (cached * bs + take).div_ceil(bs) - cached;
        // Reactivating a cached, unused block takes a slot that was allocatable.
        let reactivated = names[..cached]
            .iter()
            .filter(|h| self.blocks.is_inactive(**h))
            .count();
        let floor = (self.cfg.watermark * self.cfg.num_gpu_blocks as f64).ceil() as usize;
        let available = self.blocks.allocatable();
        if available < new_slots + reactivated + floor {
            return None;
        }
        let mut seq = self.waiting.pop_front().expect("front exists");
        for h in &names[..cached] {
            self.blocks.acquire(*h);
        }
        for _ in 0..new_slots {
            let ok = self.blocks.allocate_partial();
            debug_assert!(ok, "checked allocatable above");
        }
        seq.held_full = cached;
        seq.partials = new_slots;
        seq.computed = cached * bs;
        seq.scheduled = take;
        if seq.cached_tokens.is_none() {
            let hit = (cached * bs).min(seq.req.prompt_tokens);
            seq.cached_tokens = Some(hit);
            self.prompt_tokens_seen += seq.req.prompt_tokens as u64;
            self.prompt_tokens_cached += hit as u64;
        }
        self.running.push(seq);
        Some(take)
    }

    /// Ensures running request `i` has slots for `take` more tokens, preempting
    /// the newest running requests if needed. False if `i` itself was preempted.
    fn reserve(&mut self, i: usize, take: usize) -> bool {
        let bs = self.cfg.block_size;
        loop {
            let seq = &self.running[i];
            let slots = seq.held_full + seq.partials;
            let needed = (seq.computed + take).div_ceil(bs).saturating_sub(slots);
            if needed == 0 {
                return true;
            }
            if self.blocks.allocatable() >= needed {
                for _ in 0..needed {
                    let ok = self.blocks.allocate_partial();
                    debug_assert!(ok);
                }
                self.running[i].partials += needed;
                return true;
            }
            // Preempt the newest running request (possibly `i` itself).
            let victim = self.running.len() - 1;
            let mut seq = self.running.remove(victim);
            self.preempted += 1;
            let scheduled = std::mem::take(&mut seq.scheduled);
            debug_assert!(
                scheduled == 0 || victim > i,
                "only unscheduled requests are preempted"
            );
            self.release_slots(&mut seq);
            seq.computed = 0;
            self.waiting.push_front(seq);
            if victim == i {
                return false;
            }
        }
    }

    fn release_slots(&mut self, seq: &mut Seq) {
        // Tail first, so the deepest blocks are the first evicted.
        for k in (0..seq.held_full).rev() {
            self.blocks.release(seq.hashes[k].seq);
        }
        for _ in 0..seq.partials {
            self.blocks.release_partial();
        }
        seq.held_full = 0;
        seq.partials = 0;
    }

    fn release_all(&mut self, mut seq: Seq) {
        self.release_slots(&mut seq);
    }
}
