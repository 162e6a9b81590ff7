//! Active sequences: the router's own model of each worker's in-flight load.
//!
//! Per worker rank, [`ActiveSequences`] tracks the requests the router sent
//! there: prefill tokens still to compute (cleared at the first output token)
//! and the KV blocks they occupy. Blocks are refcounted by sequence hash, so
//! requests sharing a prefix count it once, as the engine's prefix cache would.
//! Output blocks can carry a decay weight, so a request near its expected end
//! weighs less. Requests that are never freed (a lost stream) are force-expired
//! after 300–600 s. [`SequenceTracker`] holds one per rank plus the request →
//! rank map, and answers the scheduler's "what if this request went there"
//! question ([`SequenceTracker::potential_load`]). Time is passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::fast_hash::IntMap;

use crate::protocols::WorkerKey;

/// Identifies a request across the router (the frontend's request id).
pub type RequestId = String;

/// Leaked requests are freed after one to two of these.
pub const EXPIRY_DURATION: Duration = Duration::from_secs(300);

/// Why a sequence operation was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    /// The request id is already tracked.
    #[error("request {0} is already tracked")]
    DuplicateRequest(RequestId),
    /// The request id is not tracked (already freed, or never added).
    #[error("request {0} is not tracked")]
    UnknownRequest(RequestId),
    /// The worker rank is not tracked.
    #[error("worker {0:?} is not tracked")]
    UnknownWorker(WorkerKey),
}

#[derive(Debug, Clone)]
struct Request {
    blocks: Vec<u64>,
    /// Prefill tokens still to compute; `None` once prefill completed.
    prefill_tokens: Option<usize>,
    expected_output_tokens: Option<u32>,
}

/// A request to start tracking.
#[derive(Debug, Clone, Copy)]
pub struct NewRequest<'a> {
    /// Its id.
    pub id: &'a str,
    /// Sequence hashes of its full prompt blocks (`None`: decode load not tracked).
    pub seq_hashes: Option<&'a [u64]>,
    /// Prompt length in tokens.
    pub isl: usize,
    /// Prompt blocks already cached on the chosen worker.
    pub overlap: u32,
    /// Expected output length (`nvext.agent_hints.osl`), for output-block decay.
    pub expected_output_tokens: Option<u32>,
}

/// In-flight requests on one worker rank.
#[derive(Debug, Clone)]
pub struct ActiveSequences {
    block_size: usize,
    requests: HashMap<RequestId, Request>,
    /// Sequence hash → number of requests holding it.
    unique_blocks: IntMap<u64, u32>,
    /// Decay weights of (exclusive) blocks of decaying requests.
    fractional: IntMap<u64, f64>,
    /// Σ (1 − weight) over `fractional`.
    fractional_deficit: f64,
    active_tokens: usize,
    expiry_deadline: Option<Instant>,
    expiry_set: Vec<RequestId>,
    /// Hashes that became held (true) or stopped being held (false), for the
    /// tracker's reverse index; only recorded when `record_changes` is set.
    changes: Vec<(u64, bool)>,
    record_changes: bool,
    /// Requests freed by forced expiry, for the tracker's request map.
    expired: Vec<RequestId>,
}

impl ActiveSequences {
    /// An empty tracker for `block_size`-token blocks.
    ///
    /// # Panics
    /// If `block_size` < 2 (rejected earlier, at configuration validation).
    pub fn new(block_size: usize) -> Self {
        assert!(block_size > 1, "block_size must be greater than 1");
        Self {
            block_size,
            requests: HashMap::new(),
            unique_blocks: IntMap::default(),
            fractional: IntMap::default(),
            fractional_deficit: 0.0,
            active_tokens: 0,
            expiry_deadline: None,
            expiry_set: Vec::new(),
            changes: Vec::new(),
            record_changes: false,
            expired: Vec::new(),
        }
    }

    fn reference(&mut self, h: u64) {
        let c = self.unique_blocks.entry(h).or_insert(0);
        *c += 1;
        if *c == 1 && self.record_changes {
            self.changes.push((h, true));
        }
    }

    /// Whether a block is held by some request here.
    pub fn holds(&self, h: u64) -> bool {
        self.unique_blocks.contains_key(&h)
    }

    /// Tokens a request still has to prefill given `overlap` cached blocks.
    pub fn new_tokens(&self, isl: usize, overlap: u32) -> usize {
        isl.saturating_sub(overlap as usize * self.block_size)
    }

    /// Starts tracking a request routed here.
    pub fn add_request(&mut self, req: NewRequest<'_>, now: Instant) -> Result<(), SequenceError> {
        self.expire(now);
        if self.requests.contains_key(req.id) {
            return Err(SequenceError::DuplicateRequest(req.id.to_string()));
        }
        let prefill = self.new_tokens(req.isl, req.overlap);
        self.active_tokens += prefill;
        let blocks = req.seq_hashes.map(<[u64]>::to_vec).unwrap_or_default();
        for &h in &blocks {
            self.reference(h);
        }
        self.requests.insert(
            req.id.to_string(),
            Request {
                blocks,
                prefill_tokens: Some(prefill),
                expected_output_tokens: req.expected_output_tokens,
            },
        );
        Ok(())
    }

    /// The request produced its first token: its prefill no longer loads the worker.
    pub fn mark_prefill_completed(&mut self, id: &str) -> Result<(), SequenceError> {
        let r = self
            .requests
            .get_mut(id)
            .ok_or_else(|| SequenceError::UnknownRequest(id.to_string()))?;
        if let Some(t) = r.prefill_tokens.take() {
            self.active_tokens -= t;
        }
        Ok(())
    }

    /// The request finished (or failed, or its client left).
    pub fn free(&mut self, id: &str) -> Result<(), SequenceError> {
        let r = self
            .requests
            .remove(id)
            .ok_or_else(|| SequenceError::UnknownRequest(id.to_string()))?;
        if let Some(t) = r.prefill_tokens {
            self.active_tokens -= t;
        }
        for h in r.blocks {
            self.unref(h);
        }
        Ok(())
    }

    /// The request grew by one output block (`hash` is fresh, e.g. random).
    ///
    /// With `decay` (`1 − output_so_far / expected_output`), every block only this
    /// request holds weighs `decay` instead of 1.
    pub fn add_output_block(
        &mut self,
        id: &str,
        hash: u64,
        decay: Option<f64>,
    ) -> Result<(), SequenceError> {
        if !self.requests.contains_key(id) {
            return Err(SequenceError::UnknownRequest(id.to_string()));
        }
        self.reference(hash);
        let r = self.requests.get_mut(id).expect("checked above");
        r.blocks.push(hash);
        if let Some(d) = decay {
            let d = d.clamp(0.0, 1.0);
            for h in &r.blocks {
                if self.unique_blocks.get(h) == Some(&1) {
                    let old = self.fractional.insert(*h, d).unwrap_or(1.0);
                    self.fractional_deficit += old - d;
                }
            }
        }
        Ok(())
    }

    /// Decay for an output block: `max(0, 1 − output_so_far / max(expected, 1))`.
    pub fn output_decay(output_so_far: u32, expected: Option<u32>) -> Option<f64> {
        expected.map(|e| (1.0 - output_so_far as f64 / e.max(1) as f64).max(0.0))
    }

    /// Expected output length of a tracked request.
    pub fn expected_output_tokens(&self, id: &str) -> Option<u32> {
        self.requests.get(id).and_then(|r| r.expected_output_tokens)
    }

    /// Decode load: distinct blocks held, decayed blocks counting their weight.
    pub fn active_blocks(&self) -> usize {
        (self.unique_blocks.len() as f64 - self.fractional_deficit)
            .round()
            .max(0.0) as usize
    }

    /// Prefill load: tokens of requests still in prefill.
    pub fn active_tokens(&self) -> usize {
        self.active_tokens
    }

    /// Requests tracked.
    pub fn num_requests(&self) -> usize {
        self.requests.len()
    }

    /// Decode blocks if a request with these sequence hashes were added.
    pub fn potential_blocks(&self, seq_hashes: Option<&[u64]>) -> usize {
        let new = seq_hashes.map_or(0, |hs| {
            hs.iter()
                .filter(|h| !self.unique_blocks.contains_key(*h))
                .count()
        });
        self.active_blocks() + new
    }

    /// Prefill tokens if a request of `isl` tokens with `overlap` cached blocks were added.
    pub fn potential_tokens(&self, isl: usize, overlap: u32) -> usize {
        self.active_tokens + self.new_tokens(isl, overlap)
    }

    fn unref(&mut self, h: u64) {
        if let Some(c) = self.unique_blocks.get_mut(&h) {
            *c -= 1;
            if *c == 0 {
                self.unique_blocks.remove(&h);
                if self.record_changes {
                    self.changes.push((h, false));
                }
                if let Some(f) = self.fractional.remove(&h) {
                    self.fractional_deficit -= 1.0 - f;
                }
            }
        }
    }

    /// Frees requests that were already tracked one full expiry period ago.
    fn expire(&mut self, now: Instant) {
        match self.expiry_deadline {
            None => {
                self.expiry_deadline = Some(now + EXPIRY_DURATION);
                self.expiry_set = self.requests.keys().cloned().collect();
            }
            Some(deadline) if now >= deadline => {
                for id in std::mem::take(&mut self.expiry_set) {
                    // Already freed ones are simply gone.
                    if self.free(&id).is_ok() && self.record_changes {
                        self.expired.push(id);
                    }
                }
                self.expiry_deadline = Some(now + EXPIRY_DURATION);
                self.expiry_set = self.requests.keys().cloned().collect();
            }
            Some(_) => {}
        }
        if self.fractional.is_empty() {
            // Re-anchor the running sum so float drift cannot accumulate.
            self.fractional_deficit = 0.0;
        }
    }
}

/// The block identities used to count a request's decode load (reference §1.3).
///
/// `None` when active blocks are not tracked. With KV reuse assumed they are the
/// prompt's rolling sequence hashes, so requests sharing a prefix share blocks;
/// otherwise fresh random values, so nothing is shared.
pub fn tracking_hashes<R: rand::Rng + ?Sized>(
    local: &[crate::hash::LocalBlockHash],
    track_active_blocks: bool,
    assume_kv_reuse: bool,
    rng: &mut R,
) -> Option<Vec<u64>> {
    use rand::RngExt;
    if !track_active_blocks {
        return None;
    }
    Some(if assume_kv_reuse {
        crate::hash::sequence_hashes(local)
            .into_iter()
            .map(|h| h.0)
            .collect()
    } else {
        (0..local.len()).map(|_| rng.random::<u64>()).collect()
    })
}

/// The load a request would add to one worker rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PotentialLoad {
    /// The rank.
    pub worker: WorkerKey,
    /// Prefill tokens it would have queued, including this request's.
    pub prefill_tokens: usize,
    /// Decode blocks it would hold, including this request's new ones.
    pub decode_blocks: usize,
}

/// Active sequences of every worker rank, plus a reverse index from block to
/// the ranks holding it, so a "what if" over all ranks costs one look-up per
/// prompt block instead of one per block per rank.
#[derive(Debug, Clone)]
pub struct SequenceTracker {
    block_size: usize,
    workers: IntMap<WorkerKey, ActiveSequences>,
    request_worker: HashMap<RequestId, WorkerKey>,
    holders: IntMap<u64, SmallVec<[WorkerKey; 2]>>,
    /// (rank, active prefill tokens, active blocks) of every rank, dense, so a
    /// "what if" over all ranks reads a few cache lines, not every tracker.
    summary: Vec<(WorkerKey, usize, usize)>,
}

impl SequenceTracker {
    /// An empty tracker.
    pub fn new(block_size: usize) -> Self {
        Self {
            block_size,
            workers: IntMap::default(),
            request_worker: HashMap::new(),
            holders: IntMap::default(),
            summary: Vec::new(),
        }
    }

    /// Starts tracking a worker rank (no-op when tracked).
    pub fn add_worker(&mut self, w: WorkerKey) {
        if self.workers.contains_key(&w) {
            return;
        }
        let mut s = ActiveSequences::new(self.block_size);
        s.record_changes = true;
        self.workers.insert(w, s);
        self.summary.push((w, 0, 0));
    }

    /// Stops tracking every rank of a worker, dropping its requests.
    pub fn remove_worker(&mut self, worker_id: u64) {
        self.workers.retain(|k, _| k.worker_id != worker_id);
        self.summary.retain(|(k, _, _)| k.worker_id != worker_id);
        self.request_worker.retain(|_, k| k.worker_id != worker_id);
        self.holders.retain(|_, ws| {
            ws.retain(|k| k.worker_id != worker_id);
            !ws.is_empty()
        });
    }

    /// Tracked ranks.
    pub fn workers(&self) -> impl Iterator<Item = WorkerKey> + '_ {
        self.workers.keys().copied()
    }

    /// One rank's sequences.
    pub fn get(&self, w: WorkerKey) -> Option<&ActiveSequences> {
        self.workers.get(&w)
    }

    /// Routes a request to `w` (adds the rank if new).
    pub fn add_request(
        &mut self,
        w: WorkerKey,
        req: NewRequest<'_>,
        now: Instant,
    ) -> Result<(), SequenceError> {
        if self.request_worker.contains_key(req.id) {
            return Err(SequenceError::DuplicateRequest(req.id.to_string()));
        }
        self.add_worker(w);
        let seqs = self.workers.get_mut(&w).expect("just added");
        let result = seqs.add_request(req, now);
        self.sync_holders(w);
        result?;
        self.request_worker.insert(req.id.to_string(), w);
        Ok(())
    }

    /// The worker a request was routed to.
    pub fn worker_of(&self, id: &str) -> Option<WorkerKey> {
        self.request_worker.get(id).copied()
    }

    /// See [`ActiveSequences::mark_prefill_completed`].
    pub fn mark_prefill_completed(&mut self, id: &str) -> Result<(), SequenceError> {
        let w = self
            .worker_of(id)
            .ok_or_else(|| SequenceError::UnknownRequest(id.into()))?;
        let result = self.ranks(w)?.mark_prefill_completed(id);
        self.sync_holders(w);
        result
    }

    /// See [`ActiveSequences::free`].
    pub fn free(&mut self, id: &str) -> Result<(), SequenceError> {
        let w = self
            .request_worker
            .remove(id)
            .ok_or_else(|| SequenceError::UnknownRequest(id.into()))?;
        let result = self.ranks(w)?.free(id);
        self.sync_holders(w);
        result
    }

    /// See [`ActiveSequences::add_output_block`].
    pub fn add_output_block(
        &mut self,
        id: &str,
        hash: u64,
        decay: Option<f64>,
    ) -> Result<(), SequenceError> {
        let w = self
            .worker_of(id)
            .ok_or_else(|| SequenceError::UnknownRequest(id.into()))?;
        let result = self.ranks(w)?.add_output_block(id, hash, decay);
        self.sync_holders(w);
        result
    }

    /// Load of every tracked rank if this request went there (`overlap` per rank).
    pub fn potential_load(
        &self,
        isl: usize,
        seq_hashes: Option<&[u64]>,
        overlap: impl Fn(WorkerKey) -> u32,
    ) -> Vec<PotentialLoad> {
        // Per rank, how many of the request's blocks it already holds.
        let mut held: SmallVec<[(WorkerKey, usize); 16]> = SmallVec::new();
        let hashes = seq_hashes.unwrap_or(&[]);
        for h in hashes {
            if let Some(ws) = self.holders.get(h) {
                for w in ws {
                    match held.iter_mut().find(|(k, _)| k == w) {
                        Some((_, n)) => *n += 1,
                        None => held.push((*w, 1)),
                    }
                }
            }
        }
        self.summary
            .iter()
            .map(|&(worker, tokens, blocks)| {
                let already = held
                    .iter()
                    .find(|(k, _)| *k == worker)
                    .map_or(0, |(_, n)| *n);
                let ov = overlap(worker) as usize * self.block_size;
                PotentialLoad {
                    worker,
                    prefill_tokens: tokens + isl.saturating_sub(ov),
                    decode_blocks: blocks + hashes.len() - already,
                }
            })
            .collect()
    }

    fn ranks(&mut self, w: WorkerKey) -> Result<&mut ActiveSequences, SequenceError> {
        self.workers
            .get_mut(&w)
            .ok_or(SequenceError::UnknownWorker(w))
    }

    /// Applies the rank's recorded hold/release transitions to the reverse index.
    fn sync_holders(&mut self, w: WorkerKey) {
        let Some(s) = self.workers.get_mut(&w) else {
            return;
        };
        for id in s.expired.drain(..) {
            self.request_worker.remove(&id);
        }
        for (h, held) in s.changes.drain(..) {
            if held {
                self.holders.entry(h).or_default().push(w);
            } else if let Some(ws) = self.holders.get_mut(&h) {
                ws.retain(|k| *k != w);
                if ws.is_empty() {
                    self.holders.remove(&h);
                }
            }
        }
        let (tokens, blocks) = (s.active_tokens(), s.active_blocks());
        if let Some(e) = self.summary.iter_mut().find(|e| e.0 == w) {
            (e.1, e.2) = (tokens, blocks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nr<'a>(
        id: &'a str,
        seq_hashes: Option<&'a [u64]>,
        isl: usize,
        overlap: u32,
        expected_output_tokens: Option<u32>,
    ) -> NewRequest<'a> {
        NewRequest {
            id,
            seq_hashes,
            isl,
            overlap,
            expected_output_tokens,
        }
    }

    #[test]
    fn tracking_hashes_follow_the_flags() {
        use rand::SeedableRng;
        let local = crate::hash::block_hashes(&(0..64).collect::<Vec<u32>>(), 16);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        assert_eq!(tracking_hashes(&local, false, true, &mut rng), None);
        let reuse = tracking_hashes(&local, true, true, &mut rng).unwrap();
        assert_eq!(
            reuse,
            tracking_hashes(&local, true, true, &mut rng).unwrap()
        );
        assert_eq!(reuse[0], local[0].0);
        let fresh = tracking_hashes(&local, true, false, &mut rng).unwrap();
        assert_eq!(fresh.len(), 4);
        assert_ne!(
            fresh,
            tracking_hashes(&local, true, false, &mut rng).unwrap()
        );
    }

    #[test]
    fn shared_prefix_blocks_count_once() {
        let t0 = Instant::now();
        let mut s = ActiveSequences::new(4);
        s.add_request(nr("a", Some(&[1, 2, 3]), 12, 0, None), t0)
            .unwrap();
        s.add_request(nr("b", Some(&[1, 2, 9]), 12, 2, None), t0)
            .unwrap();
        assert_eq!(s.active_blocks(), 4);
        assert_eq!(s.active_tokens(), 12 + 4);
        assert_eq!(s.potential_blocks(Some(&[1, 7])), 5);
        assert_eq!(s.potential_tokens(10, 1), 16 + 6);
        s.mark_prefill_completed("a").unwrap();
        s.mark_prefill_completed("a").unwrap();
        assert_eq!(s.active_tokens(), 4);
        s.free("a").unwrap();
        assert_eq!(s.active_blocks(), 3);
        assert_eq!(s.active_tokens(), 4);
        s.free("b").unwrap();
        assert_eq!((s.active_blocks(), s.active_tokens()), (0, 0));
        assert_eq!(s.free("b"), Err(SequenceError::UnknownRequest("b".into())));
    }

    #[test]
    fn duplicates_and_overlap_beyond_isl() {
        let t0 = Instant::now();
        let mut s = ActiveSequences::new(16);
        s.add_request(nr("a", None, 10, 5, None), t0).unwrap();
        assert_eq!(s.active_tokens(), 0, "negative new tokens clamp to 0");
        assert_eq!(
            s.add_request(nr("a", None, 10, 0, None), t0),
            Err(SequenceError::DuplicateRequest("a".into()))
        );
    }

    #[test]
    fn output_blocks_decay() {
        let t0 = Instant::now();
        let mut s = ActiveSequences::new(4);
        s.add_request(nr("a", Some(&[1, 2]), 8, 0, Some(8)), t0)
            .unwrap();
        s.add_request(nr("b", Some(&[1]), 4, 0, None), t0).unwrap();
        assert_eq!(ActiveSequences::output_decay(6, Some(8)), Some(0.25));
        assert_eq!(ActiveSequences::output_decay(9, Some(8)), Some(0.0));
        assert_eq!(ActiveSequences::output_decay(3, None), None);
        s.add_output_block("a", 100, Some(0.25)).unwrap();
        // Block 1 is shared with b: full weight. Blocks 2 and 100 weigh 0.25.
        assert_eq!(s.active_blocks(), 2); // round(3 − 1.5)
        s.free("a").unwrap();
        assert_eq!(s.active_blocks(), 1);
        s.free("b").unwrap();
        assert_eq!(s.active_blocks(), 0);
    }

    #[test]
    fn leaked_requests_expire_after_one_to_two_periods() {
        let t0 = Instant::now();
        let mut s = ActiveSequences::new(4);
        s.add_request(nr("leak", Some(&[1]), 4, 0, None), t0)
            .unwrap();
        s.add_request(nr("x", None, 4, 0, None), t0 + Duration::from_secs(299))
            .unwrap();
        assert_eq!(s.num_requests(), 2);
        // First deadline: the snapshot taken at start was empty, so nothing expires yet.
        s.add_request(nr("y", None, 4, 0, None), t0 + Duration::from_secs(301))
            .unwrap();
        assert_eq!(s.num_requests(), 3);
        s.free("y").unwrap();
        // Second deadline: everything tracked at the first one is freed.
        s.add_request(nr("z", None, 4, 0, None), t0 + Duration::from_secs(602))
            .unwrap();
        assert_eq!(s.num_requests(), 1);
        assert_eq!((s.active_blocks(), s.active_tokens()), (0, 4));
    }

    #[test]
    fn tracker_routes_lifecycle_by_request_id() {
        let t0 = Instant::now();
        let (w1, w2) = (WorkerKey::new(1, 0), WorkerKey::new(2, 0));
        let mut t = SequenceTracker::new(4);
        t.add_worker(w2);
        t.add_request(w1, nr("r", Some(&[5]), 8, 1, None), t0)
            .unwrap();
        assert_eq!(t.worker_of("r"), Some(w1));
        let mut loads = t.potential_load(8, Some(&[5]), |w| u32::from(w == w1));
        loads.sort_by_key(|l| l.worker);
        assert_eq!(loads[0].prefill_tokens, 4 + 4);
        assert_eq!(loads[0].decode_blocks, 1);
        assert_eq!(loads[1].prefill_tokens, 8);
        assert_eq!(loads[1].decode_blocks, 1);
        t.mark_prefill_completed("r").unwrap();
        t.add_output_block("r", 77, None).unwrap();
        assert_eq!(t.get(w1).unwrap().active_blocks(), 2);
        t.free("r").unwrap();
        assert!(t.free("r").is_err());
        t.remove_worker(1);
        assert_eq!(t.workers().count(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u8, Vec<u8>, u16, u8),
        Prefill(u8),
        Free(u8),
        Output(u8, Option<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                0u8..12,
                proptest::collection::vec(0u8..20, 0..6),
                0u16..200,
                0u8..8
            )
                .prop_map(|(r, b, isl, ov)| Op::Add(r, b, isl, ov)),
            (0u8..12).prop_map(Op::Prefill),
            (0u8..12).prop_map(Op::Free),
            (0u8..12, proptest::option::of(0u8..=100)).prop_map(|(r, d)| Op::Output(r, d)),
        ]
    }

    proptest! {
        /// The tracker's reverse index gives the same "what if" as asking each rank.
        #[test]
        fn tracker_potential_load_matches_each_rank(
            ops in proptest::collection::vec((0u8..4, 0u8..10, proptest::collection::vec(0u64..12, 0..6), any::<bool>()), 1..60),
            probe in proptest::collection::vec(0u64..12, 0..8),
        ) {
            let t0 = Instant::now();
            let mut t = SequenceTracker::new(4);
            for (w, r, blocks, add) in &ops {
                let id = format!("r{r}");
                if *add {
                    let _ = t.add_request(WorkerKey::new(*w as u64, 0), nr(&id, Some(blocks), 16, 1, None), t0);
                } else {
                    let _ = t.free(&id);
                }
            }
            for load in t.potential_load(16, Some(&probe), |_| 0) {
                let s = t.get(load.worker).unwrap();
                prop_assert_eq!(load.decode_blocks, s.potential_blocks(Some(&probe)));
                prop_assert_eq!(load.prefill_tokens, s.potential_tokens(16, 0));
            }
        }

        /// Incremental counts equal a recount from the live requests after any sequence.
        #[test]
        fn counts_match_a_recount(ops in proptest::collection::vec(op(), 1..80)) {
            let t0 = Instant::now();
            let bs = 8usize;
            let mut s = ActiveSequences::new(bs);
            // Model: request → (blocks, prefill tokens or None), and per-block weights.
            let mut model: HashMap<String, (Vec<u64>, Option<usize>)> = HashMap::new();
            let mut weight: HashMap<u64, f64> = HashMap::new();
            let mut next_hash = 1000u64;
            for op in ops {
                match op {
                    Op::Add(r, blocks, isl, ov) => {
                        let id = format!("r{r}");
                        let hs: Vec<u64> = blocks.iter().map(|&b| b as u64).collect();
                        let res = s.add_request(nr(&id, Some(&hs), isl as usize, ov as u32, None), t0);
                        prop_assert_eq!(res.is_ok(), !model.contains_key(&id));
                        if res.is_ok() {
                            let prefill = (isl as usize).saturating_sub(ov as usize * bs);
                            model.insert(id, (hs, Some(prefill)));
                        }
                    }
                    Op::Prefill(r) => {
                        let id = format!("r{r}");
                        prop_assert_eq!(s.mark_prefill_completed(&id).is_ok(), model.contains_key(&id));
                        if let Some(m) = model.get_mut(&id) { m.1 = None; }
                    }
                    Op::Free(r) => {
                        let id = format!("r{r}");
                        prop_assert_eq!(s.free(&id).is_ok(), model.remove(&id).is_some());
                    }
                    Op::Output(r, d) => {
                        let id = format!("r{r}");
                        let decay = d.map(|d| d as f64 / 100.0);
                        next_hash += 1;
                        prop_assert_eq!(s.add_output_block(&id, next_hash, decay).is_ok(), model.contains_key(&id));
                        if let Some(m) = model.get_mut(&id) {
                            m.0.push(next_hash);
                            if let Some(d) = decay {
                                let mut counts: HashMap<u64, usize> = HashMap::new();
                                for (bl, _) in model.values() { for h in bl { *counts.entry(*h).or_default() += 1; } }
                                for h in &model[&id].0 { if counts[h] == 1 { weight.insert(*h, d); } }
                            }
                        }
                    }
                }
                let mut live: HashMap<u64, usize> = HashMap::new();
                for (bl, _) in model.values() { for h in bl { *live.entry(*h).or_default() += 1; } }
                weight.retain(|h, _| live.contains_key(h));
                let expect_blocks = live.len() as f64 - weight.values().map(|w| 1.0 - w).sum::<f64>();
                let expect_tokens: usize = model.values().filter_map(|m| m.1).sum();
                prop_assert_eq!(s.active_tokens(), expect_tokens);
                prop_assert!((s.active_blocks() as f64 - expect_blocks.round()).abs() <= 1.0);
                if (expect_blocks - expect_blocks.floor() - 0.5).abs() > 1e-6 {
                    prop_assert_eq!(s.active_blocks(), expect_blocks.round() as usize);
                }
                prop_assert_eq!(s.num_requests(), model.len());
            }
        }
    }
}
