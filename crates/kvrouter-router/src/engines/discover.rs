//! Start-up of an engine pool: every engine is asked its model (engines
//! that disagree are an error naming them), health, geometry and KV-event
//! ports before the router exists, since whether any engine publishes events
//! decides between exact and approximate routing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use kvrouter_engines::EngineSpec;
use kvrouter_engines::metrics::EngineMetrics;
use kvrouter_engines::probe::{Probe, RankEvents};
use kvrouter_engines::spec::rank_endpoint;
use kvrouter_engines::upstream::HttpUpstream;
use kvrouter_runtime::endpoint::WorkerMetadata;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Engine, EnginePool, EnginePoolConfig, engine_id, follow};
use crate::predicted::Predicted;
use crate::router::KvRouter;

/// What the engines said at start-up, before the router is built (whether
/// any engine publishes events decides between exact and approximate routing).
pub struct Discovered {
    cfg: EnginePoolConfig,
    client: reqwest::Client,
    model: String,
    engines: Vec<Found>,
}

struct Found {
    spec: EngineSpec,
    probe: Probe,
    events: Vec<RankEvents>,
    up: bool,
    scrape: kvrouter_engines::probe::Scrape,
}

impl Discovered {
    /// The model the engines serve.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Whether any engine publishes KV events.
    pub fn publishes_events(&self) -> bool {
        self.engines.iter().any(|e| !e.events.is_empty())
    }

    /// The block size the engines report, when they agree on one.
    pub fn block_size(&self) -> Option<u32> {
        let sizes: std::collections::BTreeSet<u32> = self
            .engines
            .iter()
            .filter_map(|e| e.scrape.block_size)
            .collect();
        (sizes.len() == 1).then(|| *sizes.first().expect("one"))
    }

    /// Subscribes to the engines' events and starts following their health and load.
    pub fn start(
        self,
        router: Arc<KvRouter>,
        metrics: EngineMetrics,
        cancel: CancellationToken,
    ) -> Arc<EnginePool> {
        let cfg = self.cfg;
        let mut engines = BTreeMap::new();
        for f in self.engines {
            let base = f.spec.base();
            let dp_size = f.spec.dp_size.max(f.events.len() as u32);
            if let Some(bs) = f.scrape.block_size
                && bs as usize != router.block_size()
            {
                tracing::error!(
                    engine = %base, engine_block_size = bs, router_block_size = router.block_size(),
                    "the engine's block size differs from --kv-cache-block-size: its blocks cannot be \
                     indexed; start it with the same size (vLLM --block-size, SGLang --page-size)"
                );
            }
            if f.events.is_empty() && router.config().use_kv_events {
                tracing::warn!(engine = %base, "the engine advertises no KV events and none were given (kv-events=): routing it approximately (its cache predicted from the router's decisions, --router-ttl)");
            }
            let id = engine_id(&base);
            let engine = Arc::new(Engine {
                id,
                upstream: HttpUpstream::new(self.client.clone(), &base, cfg.first_byte_timeout),
                probe: f.probe,
                healthy: AtomicBool::new(f.up),
                dp_size,
                events: f.events,
                sources: Mutex::new(Vec::new()),
                total_kv_blocks: AtomicU64::new(f.scrape.num_gpu_blocks.unwrap_or(0)),
                completed: AtomicU64::new(0),
                silent_reported: AtomicBool::new(false),
                metrics: metrics.clone(),
                base,
            });
            router.add_worker(
                id,
                &WorkerMetadata {
                    model_name: self.model.clone(),
                    block_size: router.block_size() as u32,
                    total_kv_blocks: f.scrape.num_gpu_blocks.unwrap_or(0),
                    max_num_seqs: 0,
                    max_num_batched_tokens: 0,
                    data_parallel_size: dp_size,
                    enable_local_indexer: false,
                },
            );
            metrics
                .healthy
                .with_label_values(&[&id.to_string(), &engine.base])
                .set(i64::from(f.up));
            engines.insert(id, engine);
        }
        // Engines without events, beside engines with: approximate per engine.
        let predicted = (router.config().use_kv_events
            && engines.values().any(|e| e.events.is_empty()))
        .then(|| Arc::new(Predicted::new(router.config().prune_config().ttl)));
        let pool = Arc::new(EnginePool {
            router,
            engines,
            model: self.model,
            metrics,
            cancel,
            tasks: Mutex::new(Vec::new()),
            predicted,
        });
        if let Some(p) = &pool.predicted {
            let task = p.spawn_expiry(pool.router.clone(), pool.cancel.clone());
            pool.tasks.lock().push(task);
        }
        pool.subscribe(cfg.replay_timeout);
        for e in pool.engines.values() {
            let task = tokio::spawn(follow(
                e.clone(),
                pool.router.clone(),
                cfg.health_interval,
                cfg.load_interval,
                pool.cancel.clone(),
            ));
            pool.tasks.lock().push(task);
        }
        pool
    }
}

impl EnginePool {
    /// Asks every engine its model (waiting up to `startup_timeout` for
    /// engines still loading), health, geometry and KV-event ports.
    pub async fn discover(cfg: EnginePoolConfig) -> Result<Discovered, String> {
        // A black-holed engine fails its connect in seconds (retryable), not at the first-byte timeout.
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + cfg.startup_timeout;
        let mut models: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut found = Vec::new();
        let mut down = Vec::new();
        for spec in &cfg.specs {
            let probe = Probe::new(client.clone(), &spec.base(), Duration::from_secs(5));
            let answer = loop {
                match probe.models().await {
                    Ok(m) => break Ok(m),
                    Err(e) if tokio::time::Instant::now() >= deadline => break Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            };
            let up = match answer {
                Ok(m) => {
                    models.entry(m[0].clone()).or_default().push(spec.base());
                    true
                }
                Err(e) => {
                    tracing::warn!(engine = %spec.base(), error = %e, "engine not answering; it joins routing once healthy");
                    down.push(spec.base());
                    false
                }
            };
            let events = match &spec.kv_events {
                Some(ep) => (0..spec.dp_size)
                    .map(|r| RankEvents {
                        rank: r,
                        endpoint: rank_endpoint(ep, r),
                        replay: spec.replay.as_deref().map(|p| rank_endpoint(p, r)),
                        topic: String::new(),
                    })
                    .collect(),
                None if up => probe.event_sources().await,
                None => Vec::new(),
            };
            let scrape = if up {
                probe.scrape().await
            } else {
                Default::default()
            };
            found.push(Found {
                spec: spec.clone(),
                probe,
                events,
                up,
                scrape,
            });
        }
        if models.len() > 1 {
            let list: Vec<String> = models
                .iter()
                .map(|(m, urls)| format!("{m} ({})", urls.join(", ")))
                .collect();
            return Err(format!(
                "the engines serve different models: {}",
                list.join("; ")
            ));
        }
        let engine_model = models.keys().next().cloned();
        let model = match (&cfg.model_name, engine_model) {
            (Some(want), Some(have)) if *want != have => {
                return Err(format!(
                    "--model-name {want} but the engines serve {have} (requests are forwarded unchanged, so the names must agree)"
                ));
            }
            (_, Some(have)) => have,
            (Some(want), None) => want.clone(),
            (None, None) => {
                return Err(format!(
                    "no engine answered GET /v1/models within {} s: {}",
                    cfg.startup_timeout.as_secs(),
                    down.join(", ")
                ));
            }
        };
        Ok(Discovered {
            cfg,
            client,
            model,
            engines: found,
        })
    }
}
