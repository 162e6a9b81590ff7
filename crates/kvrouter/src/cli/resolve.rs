//! From parsed flags to validated settings, and the `--dump-config-to` document.

use std::path::Path;

use clap::CommandFactory;
use kvrouter_core::KvRouterConfig;
use kvrouter_core::busy::LoadThresholds;
use kvrouter_core::config::ConfigError;
use kvrouter_mocker::sim::SimMode;
use serde_json::{Map, Value, json};

use super::args::{BusyArgs, KvArgs, QueueArgs, RuntimeArgs, StoreKv};
use super::plan::Plan;
use super::{Cli, Command, Parsed, Source};

/// One invalid setting or combination, naming the flags to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Flags involved (`--router-temperature`).
    pub flags: Vec<String>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.flags.join(" + "), self.message)
    }
}

/// Validated settings of a subcommand: the typed [`Plan`] it runs and, for
/// `--dump-config-to`, every setting as JSON.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Subcommand name.
    pub subcommand: &'static str,
    /// What to run, with exactly the values it runs with.
    pub plan: Plan,
    /// Every setting as JSON, keyed like the dump.
    pub settings: Map<String, Value>,
}

/// `KvRouterConfig` field → the argument ids that set it.
fn config_args(field: &str) -> &'static [&'static str] {
    match field {
        "use_kv_events" => &["kv_events", "no_kv_events"],
        "router_track_active_blocks" => &["track_active_blocks", "no_track_active_blocks"],
        "router_assume_kv_reuse" => &["assume_kv_reuse", "no_assume_kv_reuse"],
        "overlap_score_weight" => &["overlap_score_weight"],
        "router_temperature" => &["router_temperature"],
        "durable_kv_events" => &["durable_kv_events"],
        "router_replica_sync" => &["router_replica_sync"],
        "router_track_output_blocks" => &["router_track_output_blocks"],
        "router_snapshot_threshold" => &["router_snapshot_threshold"],
        "router_reset_states" => &["router_reset_states"],
        "router_ttl_secs" => &["router_ttl_secs"],
        "router_max_tree_size" => &["router_max_tree_size"],
        "router_prune_target_ratio" => &["router_prune_target_ratio"],
        "router_queue_threshold" => &["router_queue_threshold"],
        "router_queue_policy" => &["router_queue_policy"],
        "router_event_threads" => &["router_event_threads"],
        "router_sticky_spill" => &["router_sticky_spill"],
        "router_sticky_stake" => &["router_sticky_stake"],
        "enable_prefix_caching" => &["enable_prefix_caching", "no_enable_prefix_caching"],
        "enable_chunked_prefill" => &["enable_chunked_prefill", "no_enable_chunked_prefill"],
        "block_size" => &["block_size", "router_block_size", "kv_cache_block_size"],
        "workers" => &["workers", "sim_workers"],
        "router_mode" => &["router_mode", "sim_router_mode"],
        _ => &[],
    }
}

fn kv_config(kv: &KvArgs, queue: Option<&QueueArgs>) -> KvRouterConfig {
    KvRouterConfig {
        overlap_score_weight: kv.overlap_score_weight,
        router_temperature: kv.router_temperature,
        use_kv_events: kv.use_kv_events(),
        durable_kv_events: kv.durable_kv_events,
        router_replica_sync: kv.router_replica_sync,
        router_track_active_blocks: kv.track_active_blocks(),
        router_track_output_blocks: kv.router_track_output_blocks,
        router_assume_kv_reuse: kv.assume_kv_reuse(),
        router_snapshot_threshold: Some(kv.router_snapshot_threshold),
        router_reset_states: kv.router_reset_states,
        router_ttl_secs: kv.router_ttl_secs,
        router_max_tree_size: kv.router_max_tree_size,
        router_prune_target_ratio: kv.router_prune_target_ratio,
        router_queue_threshold: queue.and_then(|q| q.router_queue_threshold),
        router_queue_policy: queue.map_or_else(Default::default, |q| q.router_queue_policy),
        router_event_threads: kv.router_event_threads,
        router_sticky_spill: kv.router_sticky_spill,
        router_sticky_stake: kv.router_sticky_stake,
    }
}

fn thresholds(b: &BusyArgs) -> LoadThresholds {
    LoadThresholds {
        active_decode_blocks_threshold: b.active_decode_blocks_threshold,
        active_prefill_tokens_threshold: b.active_prefill_tokens_threshold,
        active_prefill_tokens_threshold_frac: b.active_prefill_tokens_threshold_frac,
    }
}

/// `--flag` spelling of an argument id in subcommand `sub`.
fn flag(sub: &str, id: &str) -> String {
    let cmd = Cli::command();
    let long = cmd
        .find_subcommand(sub)
        .and_then(|s| {
            s.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_long())
        })
        .map(str::to_string);
    format!("--{}", long.unwrap_or_else(|| id.replace('_', "-")))
}

fn config_problems(sub: &str, errs: Vec<ConfigError>) -> Vec<Problem> {
    errs.into_iter()
        .map(|e| Problem {
            flags: e
                .fields
                .iter()
                .map(|f| {
                    let ids = config_args(f);
                    let id = ids.first().copied().unwrap_or(f);
                    if ids.len() == 2 && ids[1].starts_with("no_") {
                        format!("{}/{}", flag(sub, ids[0]), flag(sub, ids[1]))
                    } else {
                        flag(sub, id)
                    }
                })
                .collect(),
            message: e.message,
        })
        .collect()
}

fn must_exist(sub: &str, id: &str, path: Option<&Path>, out: &mut Vec<Problem>) {
    if let Some(p) = path
        && !p.exists()
    {
        out.push(Problem {
            flags: vec![flag(sub, id)],
            message: format!("{} does not exist", p.display()),
        });
    }
}

fn positive(sub: &str, id: &str, v: f64, min_exclusive: f64, out: &mut Vec<Problem>) {
    if !(v.is_finite() && v > min_exclusive) {
        out.push(Problem {
            flags: vec![flag(sub, id)],
            message: format!("must be a finite number > {min_exclusive}, got {v}"),
        });
    }
}

/// `ns.component.endpoint` (with an optional `dyn://`), each part non-empty.
pub fn valid_endpoint(s: &str) -> bool {
    let s = s.strip_prefix("dyn://").unwrap_or(s);
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

/// Reference flags kvrouter parses so that a Dynamo deployment script gets a
/// reason instead of "unexpected argument", but does not implement: any value
/// that would ask for the missing behaviour is refused (issue 15).
fn unimplemented_problems(sub: &str, r: &RuntimeArgs, out: &mut Vec<Problem>) {
    use super::args::Connector;
    if r.connector
        .iter()
        .any(|c| !matches!(c, Connector::None | Connector::Null))
    {
        out.push(Problem {
            flags: vec![flag(sub, "connector")],
            message: "KV transfer connectors are not implemented: kvrouter's mock workers \
                      transfer no KV; configure a real engine's connector on the engine \
                      (only `none` or `null` is accepted here)"
                .into(),
        });
    }
    if r.dyn_tool_call_parser.is_some() {
        out.push(Problem {
            flags: vec![flag(sub, "dyn_tool_call_parser")],
            message: "tool-call parsing is not implemented: with --engine, the engine's own \
                      parser applies (start vLLM or SGLang with theirs); leave this flag out"
                .into(),
        });
    }
    // The reasoning parser works where kvrouter renders answers: `frontend`
    // and `serve` over mock or token-level workers (checked there, with --engine).
    if r.dyn_reasoning_parser.is_some() && !matches!(sub, "frontend" | "serve") {
        out.push(Problem {
            flags: vec![flag(sub, "dyn_reasoning_parser")],
            message: format!(
                "`{sub}` renders no answers: give the reasoning parser to the frontend \
                 (`kvrouter frontend` or `serve`)"
            ),
        });
    }
}

fn runtime_problems(sub: &str, r: &RuntimeArgs, out: &mut Vec<Problem>) {
    unimplemented_problems(sub, r, out);
    must_exist(
        sub,
        "custom_jinja_template",
        r.custom_jinja_template.as_deref(),
        out,
    );
    if r.namespace.is_empty() || r.namespace.contains(['.', ' ', '/']) {
        out.push(Problem {
            flags: vec![flag(sub, "namespace")],
            message: format!(
                "{:?} is not a namespace (no dots, spaces or slashes)",
                r.namespace
            ),
        });
    }
}

impl Parsed {
    /// Validates every rule; returns the settings or every problem found.
    pub fn resolve(&self) -> Result<Resolved, Vec<Problem>> {
        let mut p = Vec::new();
        // Whether the user set an argument (command line or environment).
        let explicit = |id: &str| self.sources.get(id).is_some_and(|s| *s != Source::Default);
        let mut settings = Map::new();
        let mut put = |v: Value| {
            if let Value::Object(m) = v {
                settings.extend(m);
            }
        };
        let (sub, plan, block_size, store_kv): (&'static str, Plan, _, _) = match &self.command {
            Command::Frontend(a) => {
                let sub = "frontend";
                let (kv, th, groups) = frontend_settings(sub, a, &explicit, &mut p);
                groups.into_iter().for_each(&mut put);
                (
                    sub,
                    Plan::Frontend(a.clone(), kv, th),
                    a.routing.kv_cache_block_size,
                    a.runtime.store_kv.or(Some(StoreKv::Etcd)),
                )
            }
            Command::Router(a) => {
                let sub = "router";
                runtime_problems(sub, &a.runtime, &mut p);
                sticky_problems(sub, false, &explicit, &mut p);
                if !valid_endpoint(&a.endpoint) {
                    p.push(Problem {
                        flags: vec![flag(sub, "endpoint")],
                        message: format!("{:?} is not namespace.component.endpoint", a.endpoint),
                    });
                }
                if a.router_block_size < 2 {
                    p.push(Problem {
                        flags: vec![flag(sub, "router_block_size")],
                        message: format!("must be at least 2, got {}", a.router_block_size),
                    });
                }
                put(
                    json!({"endpoint": a.endpoint, "graceful_shutdown_timeout": a.graceful_shutdown_timeout}),
                );
                put(json!(a.runtime));
                (
                    sub,
                    Plan::Router(a.clone(), kv_config(&a.kv, None)),
                    Some(a.router_block_size),
                    a.runtime.store_kv.or(Some(StoreKv::Etcd)),
                )
            }
            Command::GlobalRouter(a) => {
                let sub = "global-router";
                runtime_problems(sub, &a.runtime, &mut p);
                if a.config.exists() {
                    // Every rule the pool configuration breaks, each under --config.
                    match kvrouter_router::global::PoolConfig::load(&a.config) {
                        Ok(_) => {}
                        Err(kvrouter_router::global::PoolConfigError::Invalid(v)) => {
                            p.extend(v.into_iter().map(|m| Problem {
                                flags: vec![flag(sub, "config")],
                                message: m,
                            }))
                        }
                        Err(e) => p.push(Problem {
                            flags: vec![flag(sub, "config")],
                            message: e.to_string(),
                        }),
                    }
                } else {
                    must_exist(sub, "config", Some(&a.config), &mut p);
                }
                for (id, v) in [
                    ("default_ttft_target", a.default_ttft_target),
                    ("default_itl_target", a.default_itl_target),
                ] {
                    if let Some(v) = v {
                        positive(sub, id, v, 0.0, &mut p);
                    }
                }
                if a.model_name.is_empty() {
                    p.push(Problem {
                        flags: vec![flag(sub, "model_name")],
                        message: "must not be empty".into(),
                    });
                }
                put(json!({
                    "config": a.config, "model_name": a.model_name, "component_name": a.component_name,
                    "default_ttft_target": a.default_ttft_target, "default_itl_target": a.default_itl_target,
                }));
                put(json!(a.runtime));
                (
                    sub,
                    Plan::GlobalRouter(a.clone()),
                    None,
                    a.runtime.store_kv.or(Some(StoreKv::Etcd)),
                )
            }
            Command::Mocker(a) => {
                let sub = "mocker";
                runtime_problems(sub, &a.runtime, &mut p);
                standin_problems(sub, a, &explicit, &mut p);
                put(json!(a.standin));
                engine_problems(sub, &a.engine, &mut p);
                must_exist(sub, "model_path", a.model.model_path.as_deref(), &mut p);
                context_problems(sub, &a.model, &mut p);
                if !valid_endpoint(&a.endpoint) {
                    p.push(Problem {
                        flags: vec![flag(sub, "endpoint")],
                        message: format!("{:?} is not namespace.component.endpoint", a.endpoint),
                    });
                }
                if a.num_workers < 1 {
                    p.push(Problem {
                        flags: vec![flag(sub, "num_workers")],
                        message: "must be at least 1".into(),
                    });
                }
                put(json!(a.model));
                put(
                    json!({"model_name": a.model.model_name.clone().unwrap_or_else(|| "mock-model".into())}),
                );
                put(json!(a.engine));
                put(
                    json!({"enable_prefix_caching": a.engine.enable_prefix_caching(), "enable_chunked_prefill": a.engine.enable_chunked_prefill()}),
                );
                put(
                    json!({"endpoint": a.endpoint, "num_workers": a.num_workers, "durable_kv_events": a.durable_kv_events, "disaggregation_mode": a.disaggregation_mode, "graceful_shutdown_timeout": a.graceful_shutdown_timeout}),
                );
                if a.durable_kv_events && a.runtime.event_plane != super::args::EventPlane::Nats {
                    p.push(Problem {
                        flags: vec![flag(sub, "durable_kv_events"), flag(sub, "event_plane")],
                        message: "durable KV events live in a NATS JetStream stream: use --event-plane nats".into(),
                    });
                }
                put(json!(a.runtime));
                (
                    sub,
                    Plan::Mocker(a.clone()),
                    Some(a.engine.block_size),
                    a.runtime.store_kv.or(Some(StoreKv::Etcd)),
                )
            }
            Command::Serve(a) => {
                let sub = "serve";
                let f = &a.frontend;
                let (kv, th, groups) = frontend_settings(sub, f, &explicit, &mut p);
                groups.into_iter().for_each(&mut put);
                engine_problems(sub, &a.engine, &mut p);
                let external = !f.engines.engines.is_empty();
                if external {
                    // With --engine no mock worker starts: its flags would do nothing.
                    let mock_ids = [
                        "workers",
                        "num_gpu_blocks",
                        "block_size",
                        "max_num_seqs",
                        "max_num_batched_tokens",
                        "enable_prefix_caching",
                        "no_enable_prefix_caching",
                        "enable_chunked_prefill",
                        "no_enable_chunked_prefill",
                        "watermark",
                        "speedup_ratio",
                        "data_parallel_size",
                    ];
                    for id in mock_ids.into_iter().filter(|id| explicit(id)) {
                        p.push(Problem {
                            flags: vec![flag(sub, "engines"), flag(sub, id)],
                            message: "no mock worker starts when --engine is given".into(),
                        });
                    }
                }
                if let Some(bs) = f.routing.kv_cache_block_size
                    && bs != a.engine.block_size
                    && !external
                {
                    p.push(Problem {
                        flags: vec![flag(sub, "kv_cache_block_size"), flag(sub, "block_size")],
                        message: format!(
                            "the router's block size ({bs}) must equal the mock workers' ({})",
                            a.engine.block_size
                        ),
                    });
                }
                if a.workers < 1 {
                    p.push(Problem {
                        flags: vec![flag(sub, "workers")],
                        message: "must be at least 1".into(),
                    });
                }
                if let Some(s) = f.runtime.store_kv
                    && s != StoreKv::Mem
                {
                    p.push(Problem {
                        flags: vec![flag(sub, "store_kv")],
                        message: "serve runs everything in one process: only `mem` applies".into(),
                    });
                }
                put(json!(a.engine));
                put(
                    json!({"workers": a.workers, "model_name": f.model.model_name.clone().unwrap_or_else(|| "mock-model".into())}),
                );
                put(
                    json!({"enable_prefix_caching": a.engine.enable_prefix_caching(), "enable_chunked_prefill": a.engine.enable_chunked_prefill()}),
                );
                let block_size = if external {
                    f.routing.kv_cache_block_size
                } else {
                    Some(a.engine.block_size)
                };
                (
                    sub,
                    Plan::Serve(a.clone(), kv, th),
                    block_size,
                    Some(StoreKv::Mem),
                )
            }
            Command::Sim(a) => {
                let sub = "sim";
                engine_problems(sub, &a.engine, &mut p);
                must_exist(sub, "trace", Some(&a.trace), &mut p);
                positive(sub, "speedup", a.speedup, 0.0, &mut p);
                if a.sim_workers < 1 {
                    p.push(Problem {
                        flags: vec![flag(sub, "sim_workers")],
                        message: "must be at least 1".into(),
                    });
                }
                if a.limit == Some(0) {
                    p.push(Problem {
                        flags: vec![flag(sub, "limit")],
                        message: "must be at least 1".into(),
                    });
                }
                let sticky = a.sim_router_mode.contains(&SimMode::KvSticky);
                sticky_problems(sub, sticky, &explicit, &mut p);
                let queued = [SimMode::Kv, SimMode::KvApprox, SimMode::KvSticky];
                if a.queue.router_queue_threshold.is_some()
                    && !a.sim_router_mode.iter().any(|m| queued.contains(m))
                {
                    p.push(Problem {
                        flags: vec![flag(sub, "router_queue_threshold"), flag(sub, "sim_router_mode")],
                        message: "the router queue applies to the kv, kv-approx and kv-sticky modes; none is simulated".into(),
                    });
                }
                if a.queue.router_queue_threshold.is_none() && explicit("router_queue_policy") {
                    p.push(Problem {
                        flags: vec![flag(sub, "router_queue_policy")],
                        message: "orders the router queue, which is off: set --router-queue-threshold too".into(),
                    });
                }
                let modes: Vec<String> = a.sim_router_mode.iter().map(|m| m.to_string()).collect();
                put(json!({
                    "trace": a.trace, "workers": a.sim_workers, "router_mode": modes, "speedup": a.speedup,
                    "limit": a.limit, "json": a.json, "plot": a.plot, "seed": a.seed, "no_progress": a.no_progress,
                }));
                put(json!(a.engine));
                put(
                    json!({"enable_prefix_caching": a.engine.enable_prefix_caching(), "enable_chunked_prefill": a.engine.enable_chunked_prefill()}),
                );
                (
                    sub,
                    Plan::Sim(a.clone(), kv_config(&a.kv, Some(&a.queue))),
                    Some(a.engine.block_size),
                    None,
                )
            }
            Command::Engine(a) => {
                let sub = "engine";
                runtime_problems(sub, &a.runtime, &mut p);
                if let Err(e) = a.spec() {
                    p.push(Problem {
                        flags: vec![flag(sub, "engine_url")],
                        message: e,
                    });
                }
                if !valid_endpoint(&a.endpoint) {
                    p.push(Problem {
                        flags: vec![flag(sub, "endpoint")],
                        message: format!("{:?} is not namespace.component.endpoint", a.endpoint),
                    });
                }
                if let Some(bs) = a.engine_block_size
                    && bs < 2
                {
                    p.push(Problem {
                        flags: vec![flag(sub, "engine_block_size")],
                        message: format!("must be at least 2, got {bs}"),
                    });
                }
                put(json!({
                    "engine_url": a.engine_url, "engine_kv_events": a.engine_kv_events,
                    "engine_replay": a.engine_replay, "engine_dp_size": a.engine_dp_size,
                    "engine_block_size": a.engine_block_size, "endpoint": a.endpoint,
                    "model_name": a.model_name,
                }));
                put(json!(a.runtime));
                (
                    sub,
                    Plan::Engine(a.clone()),
                    a.engine_block_size,
                    a.runtime.store_kv.or(Some(StoreKv::Etcd)),
                )
            }
            Command::Call(a) => {
                let sub = "call";
                runtime_problems(sub, &a.runtime, &mut p);
                if !valid_endpoint(&a.endpoint) {
                    p.push(Problem {
                        flags: vec!["ENDPOINT".into()],
                        message: format!("{:?} is not namespace.component.endpoint", a.endpoint),
                    });
                }
                if let Some(b) = &a.body
                    && b != "-"
                    && serde_json::from_str::<Value>(b).is_err()
                {
                    p.push(Problem {
                        flags: vec!["JSON".into()],
                        message: "the request body is not valid JSON".into(),
                    });
                }
                if !(a.wait.is_finite() && a.wait >= 0.0) {
                    p.push(Problem {
                        flags: vec![flag(sub, "wait")],
                        message: format!("must be a finite number ≥ 0, got {}", a.wait),
                    });
                }
                put(json!({"endpoint": a.endpoint, "instance": a.instance, "wait": a.wait}));
                put(json!(a.runtime));
                (
                    sub,
                    Plan::Call(a.clone()),
                    None,
                    a.runtime.store_kv.or(Some(StoreKv::Etcd)),
                )
            }
            Command::SynthTrace(a) => {
                let sub = "synth-trace";
                positive(sub, "rate", a.rate, 0.0, &mut p);
                if a.requests < 1 {
                    p.push(Problem {
                        flags: vec![flag(sub, "requests")],
                        message: "must be at least 1".into(),
                    });
                }
                put(json!({
                    "shape": a.shape.to_string(), "requests": a.requests, "rate": a.rate,
                    "synth_seed": a.synth_seed, "out": a.out,
                }));
                (sub, Plan::SynthTrace(a.clone()), None, None)
            }
            Command::Bench(b) => {
                return Ok(Resolved {
                    subcommand: "bench",
                    plan: Plan::Bench(b.clone()),
                    settings,
                });
            }
        };
        if let Some(kv) = plan.router_config() {
            p.extend(config_problems(sub, kv.validate()));
        }
        if let Some(th) = plan.thresholds() {
            for e in th.validate() {
                p.push(Problem {
                    flags: e.fields.iter().map(|f| flag(sub, f)).collect(),
                    message: e.message,
                });
            }
        }
        settings.insert("block_size".into(), json!(block_size));
        settings.insert("store_kv".into(), json!(store_kv));
        if !p.is_empty() {
            return Err(p);
        }
        Ok(Resolved {
            subcommand: sub,
            plan,
            settings,
        })
    }

    /// Where a resolved key's value came from.
    pub fn source_of(&self, key: &str) -> Source {
        let ids = config_args(key);
        let ids: Vec<&str> = if ids.is_empty() {
            vec![key]
        } else {
            ids.to_vec()
        };
        ids.iter()
            .filter_map(|id| self.sources.get(*id))
            .find(|s| **s != Source::Default)
            .cloned()
            .unwrap_or(Source::Default)
    }

    /// The `--dump-config-to` document: values and their sources.
    pub fn dump(&self, r: &Resolved) -> Value {
        let mut sources = Map::new();
        let mut keys: Vec<String> = r.settings.keys().cloned().collect();
        let kv = r.plan.router_config().map(|c| json!(c));
        if let Some(Value::Object(m)) = &kv {
            keys.extend(m.keys().cloned());
        }
        for k in keys {
            sources.insert(k.clone(), json!(self.source_of(&k).to_string()));
        }
        json!({
            "subcommand": r.subcommand,
            "kv_router_config": kv,
            "busy_thresholds": r.plan.thresholds(),
            "settings": r.settings,
            "sources": sources,
        })
    }
}

/// Checks and settings shared by `frontend` and `serve` (which runs a frontend).
fn context_problems(sub: &str, m: &super::args::ModelArgs, p: &mut Vec<Problem>) {
    if let Some(n) = m.context_length
        && n < 2
    {
        p.push(Problem {
            flags: vec![flag(sub, "context_length")],
            message: format!(
                "must be at least 2 tokens (a prompt token and an output token), got {n}"
            ),
        });
    }
}

fn frontend_settings(
    sub: &str,
    a: &super::FrontendArgs,
    explicit: &dyn Fn(&str) -> bool,
    p: &mut Vec<Problem>,
) -> (KvRouterConfig, LoadThresholds, Vec<Value>) {
    runtime_problems(sub, &a.runtime, p);
    engine_set_problems(sub, a, explicit, p);
    must_exist(sub, "model_path", a.model.model_path.as_deref(), p);
    context_problems(sub, &a.model, p);
    if a.runtime.dyn_reasoning_parser.is_some() && !a.engines.engines.is_empty() {
        p.push(Problem {
            flags: vec![flag(sub, "dyn_reasoning_parser"), flag(sub, "engines")],
            message: "answers of --engine engines are passed through unchanged: start the \
                      engine with its own reasoning parser (vLLM --reasoning-parser, SGLang \
                      --reasoning-parser) and leave this flag out"
                .into(),
        });
    }
    if a.routing.migration_limit > 0 && !a.engines.engines.is_empty() {
        p.push(Problem {
            flags: vec![flag(sub, "migration_limit"), flag(sub, "engines")],
            message: format!(
                "requests forwarded to --engine engines cannot move once the engine's \
                 answer has started (it is passed through unchanged), and before that \
                 they are always retried on another engine (got {}): leave it 0",
                a.routing.migration_limit
            ),
        });
    }
    queue_problems(sub, a, explicit, p);
    let sticky = a.routing.router_mode == kvrouter_core::RouterMode::KvSticky;
    sticky_problems(sub, sticky, explicit, p);
    if let Some(bs) = a.routing.kv_cache_block_size
        && bs < 2
    {
        p.push(Problem {
            flags: vec![flag(sub, "kv_cache_block_size")],
            message: format!("must be at least 2, got {bs}"),
        });
    }
    for (id, e) in [
        ("router_endpoint", &a.routing.router_endpoint),
        (
            "prefill_router_endpoint",
            &a.routing.prefill_router_endpoint,
        ),
    ] {
        if let Some(e) = e
            && !valid_endpoint(e)
        {
            p.push(Problem {
                flags: vec![flag(sub, id)],
                message: format!("{e:?} is not namespace.component.endpoint"),
            });
        }
    }
    let groups = vec![
        json!(a.http),
        json!(a.model),
        json!(a.routing),
        json!(a.busy),
        json!(a.runtime),
        json!(a.engines),
    ];
    (
        kv_config(&a.kv, Some(&a.queue)),
        thresholds(&a.busy),
        groups,
    )
}

/// `--router-sticky-spill` and `--router-sticky-stake` only tune `kv-sticky`:
/// refused anywhere else.
fn sticky_problems(sub: &str, sticky: bool, explicit: &dyn Fn(&str) -> bool, p: &mut Vec<Problem>) {
    for id in ["router_sticky_spill", "router_sticky_stake"] {
        if !sticky && explicit(id) {
            let how = if sub == "router" {
                "the standalone router routes by the kv cost"
            } else {
                "it tunes --router-mode kv-sticky, which is not selected"
            };
            p.push(Problem {
                flags: vec![flag(sub, id)],
                message: how.into(),
            });
        }
    }
}

/// The router queue applies only where this frontend's own KV router picks
/// workers whose batch size it knows; anywhere else the flags would do nothing.
fn queue_problems(
    sub: &str,
    a: &super::FrontendArgs,
    explicit: &dyn Fn(&str) -> bool,
    p: &mut Vec<Problem>,
) {
    if a.queue.router_queue_threshold.is_none() {
        if explicit("router_queue_policy") {
            p.push(Problem {
                flags: vec![flag(sub, "router_queue_policy")],
                message: "orders the router queue, which is off: set --router-queue-threshold too"
                    .into(),
            });
        }
        return;
    }
    let why = if !a.routing.router_mode.kv_aware() {
        Some((
            "router_mode",
            "the queue waits on the KV router's load model: it needs --router-mode kv",
        ))
    } else if a.routing.router_endpoint.is_some() {
        Some((
            "router_endpoint",
            "through --router-endpoint the standalone router picks the workers; this \
             frontend has no load to queue on",
        ))
    } else if !a.engines.engines.is_empty() {
        Some((
            "engines",
            "vLLM and SGLang do not publish max_num_batched_tokens, so saturation cannot be \
             told; bound the engines' own queues (vLLM --max-num-seqs) or use the busy thresholds",
        ))
    } else {
        None
    };
    if let Some((other, message)) = why {
        p.push(Problem {
            flags: vec![flag(sub, "router_queue_threshold"), flag(sub, other)],
            message: message.into(),
        });
    }
}

/// `--engine`: no engine twice, and nothing that only applies to kvrouter workers.
fn engine_set_problems(
    sub: &str,
    a: &super::FrontendArgs,
    explicit: &dyn Fn(&str) -> bool,
    p: &mut Vec<Problem>,
) {
    let engines = &a.engines.engines;
    let mut seen = std::collections::BTreeSet::new();
    for e in engines {
        if !seen.insert(e.base()) {
            p.push(Problem {
                flags: vec![flag(sub, "engines")],
                message: format!("{} is given more than once", e.base()),
            });
        }
    }
    if engines.is_empty() {
        return;
    }
    for id in ["router_endpoint", "prefill_router_endpoint"] {
        if explicit(id) {
            p.push(Problem {
                flags: vec![flag(sub, "engines"), flag(sub, id)],
                message: "requests go straight to the --engine servers; a router endpoint cannot apply too".into(),
            });
        }
    }
    for id in ["store_kv", "request_plane", "event_plane"] {
        if explicit(id) && sub != "serve" {
            p.push(Problem {
                flags: vec![flag(sub, "engines"), flag(sub, id)],
                message: "engines are reached over HTTP and ZeroMQ directly: no discovery or planes are used".into(),
            });
        }
    }
}

/// The stand-in engine's flags: each only with what it applies to.
fn standin_problems(
    sub: &str,
    a: &super::MockerArgs,
    explicit: &dyn Fn(&str) -> bool,
    p: &mut Vec<Problem>,
) {
    let s = &a.standin;
    let mut need = |id: &str, needed: &str, ok: bool| {
        if explicit(id) && !ok {
            p.push(Problem {
                flags: vec![flag(sub, id)],
                message: format!("applies only with {}", flag(sub, needed)),
            });
        }
    };
    need("openai_host", "openai_port", s.openai_port.is_some());
    need(
        "zmq_replay_port",
        "zmq_kv_events_port",
        s.zmq_kv_events_port.is_some(),
    );
    need(
        "zmq_event_format",
        "zmq_kv_events_port",
        s.zmq_kv_events_port.is_some(),
    );
    let ranks = a.engine.data_parallel_size.max(1);
    for id in ["zmq_kv_events_port", "zmq_replay_port"] {
        let port = if id == "zmq_kv_events_port" {
            s.zmq_kv_events_port
        } else {
            s.zmq_replay_port
        };
        if let Some(port) = port
            && u32::from(port) + ranks - 1 > u32::from(u16::MAX)
        {
            p.push(Problem {
                flags: vec![flag(sub, id), flag(sub, "data_parallel_size")],
                message: format!(
                    "rank {} would publish on port {}",
                    ranks - 1,
                    u32::from(port) + ranks - 1
                ),
            });
        }
    }
    if s.zmq_kv_events_port.is_some() && s.openai_port.is_none() && a.num_workers != 1 {
        p.push(Problem {
            flags: vec![flag(sub, "zmq_kv_events_port"), flag(sub, "num_workers")],
            message: "each worker would bind the same ZeroMQ ports: run one worker per process"
                .into(),
        });
    }
    if s.openai_port.is_some() {
        if a.num_workers != 1 {
            p.push(Problem {
                flags: vec![flag(sub, "openai_port"), flag(sub, "num_workers")],
                message: "a stand-in engine is one engine per process (data-parallel ranks: --data-parallel-size)".into(),
            });
        }
        for id in ["durable_kv_events", "disaggregation_mode", "endpoint"] {
            if explicit(id) {
                p.push(Problem {
                    flags: vec![flag(sub, "openai_port"), flag(sub, id)],
                    message: "a stand-in engine serves HTTP only: it registers nowhere".into(),
                });
            }
        }
    }
}

fn engine_problems(sub: &str, e: &super::args::EngineArgs, out: &mut Vec<Problem>) {
    for (id, v) in [
        ("num_gpu_blocks", e.num_gpu_blocks),
        ("max_num_seqs", e.max_num_seqs as u64),
        ("max_num_batched_tokens", e.max_num_batched_tokens as u64),
        ("data_parallel_size", e.data_parallel_size as u64),
    ] {
        if v < 1 {
            out.push(Problem {
                flags: vec![flag(sub, id)],
                message: "must be at least 1".into(),
            });
        }
    }
    if e.block_size < 2 {
        out.push(Problem {
            flags: vec![flag(sub, "block_size")],
            message: format!("must be at least 2, got {}", e.block_size),
        });
    }
    if !(e.watermark.is_finite() && (0.0..1.0).contains(&e.watermark)) {
        out.push(Problem {
            flags: vec![flag(sub, "watermark")],
            message: format!("must be in [0, 1), got {}", e.watermark),
        });
    }
    positive(sub, "speedup_ratio", e.speedup_ratio, 0.0, out);
}
