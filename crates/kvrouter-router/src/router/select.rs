//! Selection and commit: the core [`Pipeline`](kvrouter_core::schedule::Pipeline)
//! run under the router's locks, with a timer on each stage and the outcome
//! counted by mode and status.

use std::sync::Arc;
use std::time::Instant;

use kvrouter_core::busy::LoadThresholds;
use kvrouter_core::schedule::RankFilter;
use kvrouter_core::{SelectionError, WorkerKey};

use super::{ActiveRequest, KvRouter, RouteError, RouteQuery, Routing, State, Workers};
use crate::sync::{AddRequest, SyncData};

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl KvRouter {
    /// Decides where a request goes, without changing any state.
    pub fn select(&self, q: &RouteQuery<'_>) -> Result<Routing, RouteError> {
        let started = Instant::now();
        let result = self.select_inner(q, started);
        let status = match &result {
            Ok(_) => "ok",
            Err(RouteError::NoWorkers) => "no_workers",
            Err(RouteError::AllWorkersBusy(_)) => "busy",
            Err(RouteError::Invalid(_)) => "invalid",
        };
        self.metrics
            .requests
            .with_label_values(&[self.mode.as_str(), status])
            .inc();
        if let Ok(r) = &result {
            self.metrics.total_ms.observe(ms(started));
            self.metrics.isl.observe(r.isl as f64);
            let blocks = r.isl / self.block_size();
            if blocks > 0 && self.mode.kv_aware() {
                self.metrics
                    .kv_hit_rate
                    .observe(f64::from(r.overlap_blocks) / blocks as f64);
            }
        }
        result
    }

    fn select_inner(&self, q: &RouteQuery<'_>, started: Instant) -> Result<Routing, RouteError> {
        if q.tokens.is_empty() {
            return Err(RouteError::Invalid("the prompt has no tokens".into()));
        }
        if let Some(o) = q.config_override
            && let Some(e) = o.validate().into_iter().next()
        {
            return Err(RouteError::Invalid(format!(
                "router_config_override.{}: {}",
                e.fields.join(","),
                e.message
            )));
        }
        let isl = q.tokens.len();
        let p = &self.pipeline;
        if !self.mode.kv_aware() {
            let st = &mut *self.state.lock();
            let ranks = eligible_ranks(st, q);
            let busy = st.busy.busy_workers();
            let plan = p
                .select_plain(self.mode, isl, ranks, &busy, &mut st.rr, &mut st.rng)
                .map_err(|e| self.route_error(st, e))?;
            self.metrics.scheduling_ms.observe(ms(started));
            return Ok(Routing::new(plan, Vec::new()));
        }
        let t = Instant::now();
        let local = p.block_hashes(q.tokens);
        self.metrics.block_hashing_ms.observe(ms(t));
        let t = Instant::now();
        let overlaps = p.lookup(self.index.as_ref(), &local, Instant::now());
        self.metrics.find_matches_ms.observe(ms(t));
        let t = Instant::now();
        let params = p.params(q.config_override);
        let st = &mut *self.state.lock();
        let seq_hashes = p.tracking_hashes(&local, &params, &mut st.rng);
        self.metrics.seq_hashing_ms.observe(ms(t));
        let t = Instant::now();
        let workers = &st.workers;
        let allowed = |w: WorkerKey| allows(workers, q, w);
        let busy = st.busy.busy_workers();
        let filter = RankFilter {
            allowed: Some(&allowed),
            busy: &busy,
        };
        let plan = p.select_kv(
            isl,
            &local,
            &params,
            seq_hashes,
            &overlaps,
            &st.tracker,
            filter,
            &mut st.rng,
        );
        let plan = plan.map_err(|e| self.route_error(st, e))?;
        self.metrics.scheduling_ms.observe(ms(t));
        if let Some(d) = &plan.decision {
            tracing::debug!(
                worker_id = d.worker.worker_id,
                dp_rank = d.worker.dp_rank,
                overlap = d.overlap_blocks,
                cost = d.cost,
                "{} = W * prefill_blocks + decode_blocks = {} * {:.3} + {:.3} (elapsed {:?})",
                d.cost,
                params.overlap_score_weight,
                d.prefill_blocks,
                d.decode_blocks,
                started.elapsed()
            );
        }
        Ok(Routing::new(plan, local))
    }

    fn route_error(&self, st: &State, e: SelectionError) -> RouteError {
        match e {
            SelectionError::EmptyPrompt => RouteError::Invalid(e.to_string()),
            SelectionError::AllWorkersBusy => {
                RouteError::AllWorkersBusy(describe(&st.busy.thresholds()))
            }
            SelectionError::NoWorkers => RouteError::NoWorkers,
        }
    }

    /// Commits a decision: tracks the request until the returned guard drops.
    pub fn begin(
        self: &Arc<Self>,
        id: impl Into<String>,
        routing: &Routing,
        expected_output_tokens: Option<u32>,
    ) -> ActiveRequest {
        let id = id.into();
        self.metrics
            .selected
            .with_label_values(&[&routing.worker.worker_id.to_string()])
            .inc();
        let tracked = self.mode.kv_aware();
        if tracked {
            let mut st = self.state.lock();
            let added = self.pipeline.commit(
                self.index.as_ref(),
                &mut st.tracker,
                &id,
                &routing.local,
                &routing.plan,
                expected_output_tokens,
                Instant::now(),
            );
            if let Err(e) = added {
                tracing::warn!(request_id = %id, error = %e, "request not tracked");
            }
            self.observe_rank(&mut st, routing.worker);
            drop(st);
            self.publish(
                &id,
                routing.worker,
                SyncData::AddRequest(AddRequest {
                    token_sequence: routing.plan.seq_hashes.clone(),
                    isl: routing.isl,
                    overlap: routing.overlap_blocks,
                    expected_output_tokens,
                }),
            );
        }
        ActiveRequest::new(self.clone(), id, routing.worker, routing.isl, tracked)
    }
}

/// Whether the query lets the request use rank `w` (a registered rank, not
/// excluded, matching any pin).
fn allows(workers: &Workers, q: &RouteQuery<'_>, w: WorkerKey) -> bool {
    !q.exclude.contains(&w.worker_id)
        && q.worker_id.is_none_or(|id| id == w.worker_id)
        && q.dp_rank.is_none_or(|d| d == w.dp_rank)
        && workers
            .get(&w.worker_id)
            .is_some_and(|m| w.dp_rank < m.data_parallel_size.max(1))
}

/// Ranks allowed by the query, in worker then rank order.
fn eligible_ranks(st: &State, q: &RouteQuery<'_>) -> Vec<WorkerKey> {
    let mut out = Vec::new();
    for (&id, meta) in &st.workers {
        for r in 0..meta.data_parallel_size.max(1) {
            let w = WorkerKey::new(id, r);
            if allows(&st.workers, q, w) {
                out.push(w);
            }
        }
    }
    out
}

/// Human-readable thresholds for the busy error.
fn describe(t: &LoadThresholds) -> String {
    let mut parts = Vec::new();
    if let Some(v) = t.active_decode_blocks_threshold {
        parts.push(format!("active_decode_blocks_threshold={v}"));
    }
    if let Some(v) = t.active_prefill_tokens_threshold {
        parts.push(format!("active_prefill_tokens_threshold={v}"));
    }
    if let Some(v) = t.active_prefill_tokens_threshold_frac {
        parts.push(format!("active_prefill_tokens_threshold_frac={v}"));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}
