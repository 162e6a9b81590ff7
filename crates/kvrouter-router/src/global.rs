//! The global router (reference §9): picks a pool of workers from the
//! request's size and latency target, then forwards the request to that
//! pool's standalone router (`{pool_namespace}.router.generate`) and streams
//! the answer back.
//!
//! Pools are chosen on a clamped grid: for prefill, rows are input-length
//! bands and columns TTFT-target bands; for decode, rows are context-length
//! bands and columns ITL-target bands. A request's target comes from its
//! `extra_args` (`ttft_target` / `itl_target`, ms), else the service default,
//! else the middle of the configured range (a 0 counts as missing).
//!
//! The service registers `{namespace}.{component}.generate` (decode pool:
//! aggregated serving, the endpoint a frontend routes to) and
//! `{namespace}.{component}.prefill` (prefill pool), declaring the model so a
//! frontend can serve it.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use kvrouter_core::llm::PreprocessedRequest;
use kvrouter_runtime::endpoint::{EndpointId, InstanceId, WorkerMetadata};
use kvrouter_runtime::node::{Node, ServeError, Served};
use kvrouter_runtime::request::{Handler, RequestError};
use prometheus::{IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::standalone::{error_json, router_endpoint};

/// Prefill pool selection grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillStrategy {
    /// Lowest input length of the grid.
    pub isl_min: i64,
    /// Highest input length.
    pub isl_max: i64,
    /// Input-length bands.
    pub isl_resolution: usize,
    /// Lowest TTFT target (ms).
    pub ttft_min: f64,
    /// Highest TTFT target (ms).
    pub ttft_max: f64,
    /// TTFT bands.
    pub ttft_resolution: usize,
    /// `[isl band][ttft band]` → prefill pool.
    pub prefill_pool_mapping: Vec<Vec<i64>>,
}

/// Decode pool selection grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeStrategy {
    /// Lowest context length.
    pub context_length_min: i64,
    /// Highest context length.
    pub context_length_max: i64,
    /// Context-length bands.
    pub context_length_resolution: usize,
    /// Lowest ITL target (ms).
    pub itl_min: f64,
    /// Highest ITL target (ms).
    pub itl_max: f64,
    /// ITL bands.
    pub itl_resolution: usize,
    /// `[context band][itl band]` → decode pool.
    pub decode_pool_mapping: Vec<Vec<i64>>,
}

/// The global router's JSON configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolConfig {
    /// Prefill pools.
    pub num_prefill_pools: usize,
    /// Decode pools.
    pub num_decode_pools: usize,
    /// Namespace of each prefill pool.
    pub prefill_pool_dynamo_namespaces: Vec<String>,
    /// Namespace of each decode pool.
    pub decode_pool_dynamo_namespaces: Vec<String>,
    /// Prefill grid.
    pub prefill_pool_selection_strategy: PrefillStrategy,
    /// Decode grid.
    pub decode_pool_selection_strategy: DecodeStrategy,
}

/// Why a pool configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PoolConfigError {
    /// The file could not be read.
    #[error("{0}")]
    Io(String),
    /// Not the expected JSON.
    #[error("not a pool configuration: {0}")]
    Json(String),
    /// Every rule it breaks.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
}

/// One selection grid: two axes, each `(name, min, max, resolution)`, and the mapping.
struct Grid<'a> {
    name: &'static str,
    rows: (&'static str, f64, f64, usize),
    cols: (&'static str, f64, f64, usize),
    pools: usize,
    mapping: &'a [Vec<i64>],
}

impl Grid<'_> {
    fn problems(&self, out: &mut Vec<String>) {
        let what = self.name;
        for (axis, min, max, res) in [self.rows, self.cols] {
            if max.partial_cmp(&min) != Some(std::cmp::Ordering::Greater) {
                out.push(format!("{what}: {axis}_max must exceed {axis}_min"));
            }
            if res == 0 {
                out.push(format!("{what}: {axis}_resolution must be at least 1"));
            }
        }
        let (rows, cols) = (self.rows.3, self.cols.3);
        if self.mapping.len() != rows {
            out.push(format!(
                "{what}: the mapping has {} rows, the resolution says {rows}",
                self.mapping.len()
            ));
        }
        for (i, row) in self.mapping.iter().enumerate() {
            if row.len() != cols {
                out.push(format!(
                    "{what}: mapping row {i} has {} columns, the resolution says {cols}",
                    row.len()
                ));
            }
            for (j, &p) in row.iter().enumerate() {
                if p < 0 || p as usize >= self.pools {
                    out.push(format!(
                        "{what}: mapping[{i}][{j}] = {p} is not a pool (0..{})",
                        self.pools
                    ));
                }
            }
        }
    }

    /// The pool of the cell holding `(x, y)`, clamped to the grid.
    fn pool(&self, x: f64, y: f64) -> usize {
        let i = band(x, self.rows.1, self.rows.2, self.rows.3);
        let j = band(y, self.cols.1, self.cols.2, self.cols.3);
        self.mapping[i][j] as usize
    }
}

impl PoolConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, PoolConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PoolConfigError::Io(format!("{}: {e}", path.display())))?;
        let cfg: Self =
            serde_json::from_str(&text).map_err(|e| PoolConfigError::Json(e.to_string()))?;
        let problems = cfg.validate();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(PoolConfigError::Invalid(problems))
        }
    }

    /// Every rule the configuration breaks.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.prefill_pool_dynamo_namespaces.len() != self.num_prefill_pools {
            p.push(format!(
                "num_prefill_pools is {} but prefill_pool_dynamo_namespaces has {}",
                self.num_prefill_pools,
                self.prefill_pool_dynamo_namespaces.len()
            ));
        }
        if self.decode_pool_dynamo_namespaces.len() != self.num_decode_pools {
            p.push(format!(
                "num_decode_pools is {} but decode_pool_dynamo_namespaces has {}",
                self.num_decode_pools,
                self.decode_pool_dynamo_namespaces.len()
            ));
        }
        self.prefill_grid().problems(&mut p);
        self.decode_grid().problems(&mut p);
        for ns in self
            .prefill_pool_dynamo_namespaces
            .iter()
            .chain(&self.decode_pool_dynamo_namespaces)
        {
            if format!("{ns}.router.generate")
                .parse::<EndpointId>()
                .is_err()
            {
                p.push(format!("{ns:?} is not a namespace"));
            }
        }
        p
    }
}

/// The band of `x` on `[min, max)` cut in `res` bands, clamped to the grid.
pub fn band(x: f64, min: f64, max: f64, res: usize) -> usize {
    let step = (max - min) / res as f64;
    // Truncation toward zero, then clamping, as the reference does.
    let i = ((x - min) / step).trunc();
    if i.is_nan() || i < 0.0 {
        0
    } else {
        (i as usize).min(res - 1)
    }
}

/// A positive target from `extra_args[key]`, else the default, else the middle.
pub fn target(extra: Option<&Value>, key: &str, default: Option<f64>, min: f64, max: f64) -> f64 {
    extra
        .and_then(|e| e.get(key))
        .and_then(Value::as_f64)
        .filter(|v| *v != 0.0)
        .or(default.filter(|v| *v != 0.0))
        .unwrap_or((min + max) / 2.0)
}

impl PoolConfig {
    fn prefill_grid(&self) -> Grid<'_> {
        let s = &self.prefill_pool_selection_strategy;
        Grid {
            name: "prefill_pool_mapping",
            rows: ("isl", s.isl_min as f64, s.isl_max as f64, s.isl_resolution),
            cols: ("ttft", s.ttft_min, s.ttft_max, s.ttft_resolution),
            pools: self.num_prefill_pools,
            mapping: &s.prefill_pool_mapping,
        }
    }

    fn decode_grid(&self) -> Grid<'_> {
        let d = &self.decode_pool_selection_strategy;
        Grid {
            name: "decode_pool_mapping",
            rows: (
                "context_length",
                d.context_length_min as f64,
                d.context_length_max as f64,
                d.context_length_resolution,
            ),
            cols: ("itl", d.itl_min, d.itl_max, d.itl_resolution),
            pools: self.num_decode_pools,
            mapping: &d.decode_pool_mapping,
        }
    }

    /// The prefill pool for `isl` tokens at a TTFT target (ms).
    pub fn prefill_pool(&self, isl: usize, ttft: f64) -> usize {
        self.prefill_grid().pool(isl as f64, ttft)
    }

    /// The decode pool for `context` tokens at an ITL target (ms).
    pub fn decode_pool(&self, context: usize, itl: f64) -> usize {
        self.decode_grid().pool(context as f64, itl)
    }
}

/// Service settings.
#[derive(Debug, Clone)]
pub struct GlobalRouterConfig {
    /// Pools.
    pub pools: PoolConfig,
    /// Model registered.
    pub model_name: String,
    /// TTFT target (ms) when a request has none.
    pub default_ttft_target: Option<f64>,
    /// ITL target (ms) when a request has none.
    pub default_itl_target: Option<f64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prefill,
    Decode,
}

struct Forward {
    node: Node,
    cfg: Arc<GlobalRouterConfig>,
    phase: Phase,
    requests: IntCounterVec,
}

impl Forward {
    fn pool_namespace(&self, req: &PreprocessedRequest) -> (usize, &str) {
        let p = &self.cfg.pools;
        let extra = req.extra_args.as_ref();
        match self.phase {
            Phase::Prefill => {
                let s = &p.prefill_pool_selection_strategy;
                let t = target(
                    extra,
                    "ttft_target",
                    self.cfg.default_ttft_target,
                    s.ttft_min,
                    s.ttft_max,
                );
                let i = p.prefill_pool(req.token_ids.len(), t);
                (i, &p.prefill_pool_dynamo_namespaces[i])
            }
            Phase::Decode => {
                let d = &p.decode_pool_selection_strategy;
                let t = target(
                    extra,
                    "itl_target",
                    self.cfg.default_itl_target,
                    d.itl_min,
                    d.itl_max,
                );
                let i = p.decode_pool(req.token_ids.len(), t);
                (i, &p.decode_pool_dynamo_namespaces[i])
            }
        }
    }
}

impl Handler for Forward {
    fn handle(
        &self,
        request: Bytes,
        _cancel: CancellationToken,
    ) -> BoxStream<'static, Result<Bytes, String>> {
        let fail = |m: String| futures::stream::once(async move { Err(m) }).boxed();
        let req: PreprocessedRequest = match serde_json::from_slice(&request) {
            Ok(r) => r,
            Err(e) => return fail(error_json("invalid_request", e)),
        };
        let (pool, ns) = self.pool_namespace(&req);
        let phase = if self.phase == Phase::Prefill {
            "prefill"
        } else {
            "decode"
        };
        self.requests
            .with_label_values(&[phase, &pool.to_string()])
            .inc();
        tracing::debug!(
            phase,
            pool,
            namespace = ns,
            isl = req.token_ids.len(),
            "pool selected"
        );
        let endpoint = router_endpoint(ns, "generate");
        let node = self.node.clone();
        futures::stream::once(async move {
            let instances = node.discovery.list(&endpoint).await.unwrap_or_default();
            let Some(first) = instances.first() else {
                return Err(error_json(
                    "no_workers",
                    format!("no router serves pool {pool} ({endpoint})"),
                ));
            };
            node.call(&first.address, request)
                .await
                .map_err(|e| error_json("worker_failed", e))
        })
        .flat_map(|called| match called {
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            Ok(responses) => futures::stream::unfold(Some(responses), |state| async move {
                let mut r = state?;
                match r.next().await? {
                    Ok(b) => Some((Ok(b), Some(r))),
                    // The pool router's typed error passes through unchanged.
                    Err(RequestError::Remote(m)) => Some((Err(m), None)),
                    Err(e) => Some((Err(error_json("worker_failed", e)), None)),
                }
            })
            .boxed(),
        })
        .boxed()
    }
}

/// A running global router; dropping it deregisters.
pub struct GlobalRouter {
    /// `{namespace}.{component}.generate` (decode pools).
    pub generate: Served,
    /// `{namespace}.{component}.prefill` (prefill pools).
    pub prefill: Served,
}

impl GlobalRouter {
    /// Registers both endpoints as instance `id`; metrics go to `registry`.
    pub async fn start(
        node: &Node,
        namespace: &str,
        component: &str,
        id: InstanceId,
        cfg: GlobalRouterConfig,
        registry: &Registry,
    ) -> Result<Self, ServeError> {
        let requests = IntCounterVec::new(
            Opts::new(
                "dynamo_global_router_requests_total",
                "Requests forwarded, by pool type and pool",
            ),
            &["pool_type", "pool"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(requests.clone()));
        // Declared like a worker so a frontend serves the model through it; the
        // capacity fields are not the global router's to know.
        let meta = serde_json::to_value(WorkerMetadata {
            model_name: cfg.model_name.clone(),
            block_size: 0,
            total_kv_blocks: 0,
            max_num_seqs: 0,
            max_num_batched_tokens: 0,
            data_parallel_size: 1,
            enable_local_indexer: false,
        })
        .expect("metadata serializes");
        let cfg = Arc::new(cfg);
        let ep = |e: &str| EndpointId {
            namespace: namespace.into(),
            component: component.into(),
            endpoint: e.into(),
        };
        let handler = |phase| {
            Arc::new(Forward {
                node: node.clone(),
                cfg: cfg.clone(),
                phase,
                requests: requests.clone(),
            })
        };
        let generate = node
            .serve(&ep("generate"), id, handler(Phase::Decode), meta.clone())
            .await?;
        let prefill = node
            .serve(&ep("prefill"), id, handler(Phase::Prefill), meta)
            .await?;
        Ok(Self { generate, prefill })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> PoolConfig {
        serde_json::from_value(json!({
            "num_prefill_pools": 2, "num_decode_pools": 2,
            "prefill_pool_dynamo_namespaces": ["p0", "p1"],
            "decode_pool_dynamo_namespaces": ["d0", "d1"],
            "prefill_pool_selection_strategy": {
                "isl_min": 0, "isl_max": 1000, "isl_resolution": 2,
                "ttft_min": 10.0, "ttft_max": 110.0, "ttft_resolution": 2,
                "prefill_pool_mapping": [[0, 1], [1, 1]]
            },
            "decode_pool_selection_strategy": {
                "context_length_min": 0, "context_length_max": 4000, "context_length_resolution": 4,
                "itl_min": 5.0, "itl_max": 25.0, "itl_resolution": 1,
                "decode_pool_mapping": [[0], [0], [1], [1]]
            }
        }))
        .unwrap()
    }

    #[test]
    fn grid_edges() {
        let c = config();
        assert!(c.validate().is_empty());
        // Below the minimum clamps to the first band, above the maximum to the last.
        assert_eq!(c.prefill_pool(0, 0.0), 0);
        assert_eq!(c.prefill_pool(0, -50.0), 0);
        assert_eq!(c.prefill_pool(0, 1e9), 1);
        assert_eq!(c.prefill_pool(5000, 10.0), 1);
        // Exactly on a boundary belongs to the upper band (truncation).
        assert_eq!(c.prefill_pool(499, 59.999), 0);
        assert_eq!(c.prefill_pool(500, 10.0), 1);
        assert_eq!(c.prefill_pool(0, 60.0), 1);
        // The maximum itself is clamped into the last band.
        assert_eq!(c.decode_pool(4000, 5.0), 1);
        assert_eq!(c.decode_pool(1999, 5.0), 0);
        assert_eq!(c.decode_pool(2000, 5.0), 1);
        assert_eq!(band(-1.0, 0.0, 10.0, 5), 0);
        assert_eq!(band(10.0, 0.0, 10.0, 5), 4);
        assert_eq!(band(3.999, 0.0, 10.0, 5), 1);
        assert_eq!(band(4.0, 0.0, 10.0, 5), 2);
    }

    #[test]
    fn targets_fall_back_in_order() {
        let e = json!({"ttft_target": 42.0, "zero": 0});
        assert_eq!(
            target(Some(&e), "ttft_target", Some(7.0), 10.0, 110.0),
            42.0
        );
        assert_eq!(target(Some(&e), "zero", Some(7.0), 10.0, 110.0), 7.0);
        assert_eq!(target(None, "ttft_target", Some(0.0), 10.0, 110.0), 60.0);
        assert_eq!(target(None, "ttft_target", None, 10.0, 110.0), 60.0);
    }

    #[test]
    fn every_violation_is_reported() {
        let mut c = config();
        c.num_prefill_pools = 3;
        c.decode_pool_dynamo_namespaces.pop();
        c.prefill_pool_selection_strategy.prefill_pool_mapping = vec![vec![0, 5]];
        c.decode_pool_selection_strategy.itl_max = 1.0;
        let p = c.validate();
        let text = p.join("\n");
        assert!(text.contains("num_prefill_pools is 3"), "{text}");
        assert!(text.contains("num_decode_pools is 2 but decode_pool_dynamo_namespaces has 1"));
        assert!(text.contains("has 1 rows, the resolution says 2"));
        assert!(text.contains("mapping[0][1] = 5 is not a pool (0..3)"));
        assert!(text.contains("itl_max must exceed itl_min"));
        assert_eq!(p.len(), 5, "{text}");
    }
}
