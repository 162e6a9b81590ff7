//! Running the long-lived services: `serve` (everything in one process),
//! `frontend` and `mocker` (separate processes over etcd/file discovery, NATS
//! events and the chosen request plane).
//!
//! Connection settings come from the environment as in Dynamo:
//! `ETCD_ENDPOINTS` (default `http://localhost:2379`), `NATS_SERVER`
//! (default `nats://localhost:4222`), `DYN_FILE_KV` (file discovery root) and
//! `DYN_TCP_ADVERTISE_HOST` (host advertised for TCP/HTTP listeners).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kvrouter_core::busy::LoadThresholds;
use kvrouter_core::{KvRouterConfig, RouterMode};
use kvrouter_frontend::serve::{
    DEFAULT_ENGINE_BLOCK_SIZE, RoutingConfig, start_engine_frontend, start_frontend,
};
use kvrouter_frontend::server::HttpLimits;
use kvrouter_frontend::{HttpOptions, Preprocessor};
use kvrouter_mocker::service::{self, WorkerConfig};
use kvrouter_mocker::vllm::ZmqEventsConfig;
use kvrouter_router::engines::EnginePoolConfig;
use kvrouter_runtime::endpoint::{EndpointId, WorkerMetadata};
use kvrouter_runtime::node::{Node, new_instance_id};
use kvrouter_serve::{Embedded, EmbeddedConfig, StandIn};
use tokio::net::TcpListener;

use crate::cli::args::{EndpointType, HttpArgs, ModelArgs, RuntimeArgs};
use crate::cli::{
    CallArgs, EngineCmdArgs, FrontendArgs, GlobalRouterArgs, MockerArgs, RouterArgs, ServeArgs,
};
use kvrouter_router::global::{GlobalRouter, GlobalRouterConfig, PoolConfig};
use kvrouter_router::sidecar::{Sidecar, SidecarConfig};
use kvrouter_router::standalone::StandaloneRouter;
use kvrouter_router::{KvRouter, RouterMetrics, WorkerPool};

/// Chance that a mock token is an end-of-sequence (mean output ≈ 200 tokens
/// when a request sets no `max_tokens`).
const EOS_PROBABILITY: f64 = 1.0 / 200.0;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Logs go to stderr; `RUST_LOG` (or `DYN_LOG`) sets the filter, default `info`.
pub fn init_tracing() {
    let filter = env("RUST_LOG")
        .or_else(|| env("DYN_LOG"))
        .unwrap_or_else(|| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn preprocessor(model: &ModelArgs, template: Option<&Path>) -> anyhow::Result<Arc<Preprocessor>> {
    let pre = match (&model.model_path, template) {
        (Some(dir), t) => Preprocessor::load(dir, t)?,
        (None, Some(t)) => Preprocessor::builtin_with_template(t)?,
        (None, None) => Preprocessor::builtin(),
    };
    Ok(Arc::new(match model.context_length {
        Some(n) => pre.with_context_length(n),
        None => pre,
    }))
}

/// The tokens of `--mock-response-text`.
fn script(pre: &Preprocessor, text: Option<&str>) -> anyhow::Result<Option<Vec<u32>>> {
    text.map(|t| pre.encode(t).context("tokenizing --mock-response-text"))
        .transpose()
}

/// `--dyn-reasoning-parser`, as the frontend's format.
fn reasoning(r: &RuntimeArgs) -> Option<kvrouter_frontend::reasoning::ReasoningFormat> {
    use crate::cli::args::ReasoningParser as P;
    use kvrouter_frontend::reasoning::ReasoningFormat as F;
    r.dyn_reasoning_parser.map(|p| match p {
        P::DeepseekR1 => F::DeepseekR1,
        P::Qwen3 => F::Qwen3,
        P::Basic => F::Basic,
    })
}

fn http_options(types: &[EndpointType], http: &HttpArgs) -> HttpOptions {
    let max_connections = match http.http_max_connections {
        Some(n) => n,
        None => auto_max_connections(),
    };
    HttpOptions {
        limits: HttpLimits {
            header_timeout: Duration::from_secs_f64(http.http_header_timeout),
            body_timeout: Duration::from_secs_f64(http.http_body_timeout),
            max_body_bytes: usize::try_from(http.http_max_body_bytes).unwrap_or(usize::MAX),
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
            graceful_timeout: Duration::from_secs_f64(http.graceful_shutdown_timeout),
            request_timeout: Duration::from_secs_f64(http.request_timeout),
            ttft_timeout: Duration::from_secs_f64(http.ttft_timeout),
        },
        chat: types.contains(&EndpointType::Chat),
        completions: types.contains(&EndpointType::Completions),
    }
}

async fn bind(host: &str, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))
}

/// Raises the open-file limit to its hard maximum and allows half of it as
/// client connections: each proxied client may hold an upstream connection
/// too, and the rest (etcd, NATS, engines, logs) needs a margin.
fn auto_max_connections() -> u64 {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    (limit.saturating_sub(128) / 2).clamp(64, 1 << 20)
}

/// Resolves on SIGTERM (how orchestrators stop a process) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops gracefully");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutdown signal: draining");
}

/// `kvrouter serve`.
pub fn serve(
    args: &ServeArgs,
    kv: KvRouterConfig,
    thresholds: LoadThresholds,
) -> anyhow::Result<()> {
    init_tracing();
    let f = &args.frontend;
    if !f.engines.engines.is_empty() {
        return engines_frontend("serve", f, kv, thresholds);
    }
    let pre = preprocessor(&f.model, f.runtime.custom_jinja_template.as_deref())?;
    let model = f
        .model
        .model_name
        .clone()
        .unwrap_or_else(|| "mock-model".into());
    let cfg = EmbeddedConfig {
        model_name: model.clone(),
        workers: args.workers,
        engine: args.engine.engine_config(),
        data_parallel_size: args.engine.data_parallel_size,
        routing: RoutingConfig {
            mode: f.routing.router_mode,
            kv,
            thresholds,
            block_size: args.engine.block_size,
            prefill_endpoint: None,
            enforce_disagg: false,
            migration_limit: f.routing.migration_limit,
        },
        http: http_options(&f.runtime.endpoint_types, &f.http),
        namespace: f.runtime.namespace.clone(),
        eos_probability: EOS_PROBABILITY,
        script: script(&pre, args.engine.mock_response_text.as_deref())?,
    };
    runtime()?.block_on(async move {
        let listener = bind(&f.http.http_host, f.http.http_port).await?;
        let mut embedded = Embedded::start(cfg, pre, listener)
            .await
            .map_err(anyhow::Error::msg)?;
        embedded
            .frontend
            .frontend
            .set_reasoning_parser(reasoning(&f.runtime));
        let addr = embedded.frontend.addr;
        println!(
            "kvrouter serve: OpenAI API on http://{addr} — model {model}, {} mock workers, router mode {}",
            args.workers, f.routing.router_mode
        );
        tokio::select! {
            _ = shutdown_signal() => {}
            r = embedded.frontend.wait() => r.context("HTTP server")?,
        }
        eprintln!("kvrouter serve: shutting down");
        embedded.shutdown().await.context("HTTP server")?;
        Ok(())
    })
}

/// `serve` / `frontend` with `--engine`: the OpenAI API over external engines.
fn engines_frontend(
    name: &str,
    f: &FrontendArgs,
    kv: KvRouterConfig,
    thresholds: LoadThresholds,
) -> anyhow::Result<()> {
    let pre = preprocessor(&f.model, f.runtime.custom_jinja_template.as_deref())?;
    let mut cfg = EnginePoolConfig::new(f.engines.engines.clone());
    cfg.model_name = f.model.model_name.clone();
    let routing = RoutingConfig {
        mode: f.routing.router_mode,
        kv,
        thresholds,
        block_size: f
            .routing
            .kv_cache_block_size
            .unwrap_or(DEFAULT_ENGINE_BLOCK_SIZE),
        prefill_endpoint: None,
        enforce_disagg: false,
        // Refused above 0 with --engine (passthrough answers cannot move).
        migration_limit: 0,
    };
    runtime()?.block_on(async move {
        let listener = bind(&f.http.http_host, f.http.http_port).await?;
        let mut handle = start_engine_frontend(
            cfg,
            pre,
            routing,
            f.routing.kv_cache_block_size,
            http_options(&f.runtime.endpoint_types, &f.http),
            listener,
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let router = handle.frontend.router();
        println!(
            "kvrouter {name}: OpenAI API on http://{} — model {}, {} engines, router mode {}{}, block size {}",
            handle.addr,
            handle.frontend.model(),
            f.engines.engines.len(),
            router.mode(),
            if router.config().use_kv_events { "" } else { " (approximate)" },
            router.block_size()
        );
        tokio::select! {
            _ = shutdown_signal() => {}
            r = handle.wait() => r.context("HTTP server")?,
        }
        handle.shutdown().await.context("HTTP server")?;
        Ok(())
    })
}

/// The process's runtime planes, as configured.
async fn node(r: &RuntimeArgs, bind_host: &str) -> anyhow::Result<Node> {
    let cfg = r.node_config(bind_host).map_err(anyhow::Error::msg)?;
    Ok(Node::connect(&cfg).await?)
}

fn worker_endpoint(namespace: &str) -> EndpointId {
    EndpointId {
        namespace: namespace.into(),
        component: "backend".into(),
        endpoint: "generate".into(),
    }
}

/// `kvrouter frontend`.
pub fn frontend(
    args: &FrontendArgs,
    kv: KvRouterConfig,
    thresholds: LoadThresholds,
) -> anyhow::Result<()> {
    init_tracing();
    if !args.engines.engines.is_empty() {
        return engines_frontend("frontend", args, kv, thresholds);
    }
    let pre = preprocessor(&args.model, args.runtime.custom_jinja_template.as_deref())?;
    runtime()?.block_on(async move {
        let node = node(&args.runtime, "0.0.0.0").await?;
        // Through a standalone or global router, the frontend only spreads
        // requests over the router instances; they pick the workers.
        let (endpoint, delegated) = match &args.routing.router_endpoint {
            Some(e) => (e.parse::<EndpointId>().map_err(anyhow::Error::msg)?, true),
            None => (worker_endpoint(&args.runtime.namespace), false),
        };
        // Without --model-name or a block size, take them from the first worker.
        let first = if !delegated
            && (args.model.model_name.is_none() || args.routing.kv_cache_block_size.is_none())
        {
            eprintln!("kvrouter frontend: waiting for a worker on {endpoint} …");
            let mut watch = node.discovery.watch(&endpoint).await?;
            loop {
                match watch.next().await {
                    Some(kvrouter_runtime::discovery::DiscoveryEvent::Added(i)) => {
                        if let Ok(m) = serde_json::from_value::<WorkerMetadata>(i.metadata) {
                            break Some(m);
                        }
                    }
                    Some(_) => {}
                    None => bail!("discovery closed"),
                }
            }
        } else {
            None
        };
        let model = args
            .model
            .model_name
            .clone()
            .or_else(|| first.as_ref().map(|m| m.model_name.clone()))
            .unwrap_or_else(|| "mock-model".into());
        let block_size = args
            .routing
            .kv_cache_block_size
            .or_else(|| first.as_ref().map(|m| m.block_size))
            .unwrap_or(64);
        let mode = if delegated {
            RouterMode::RoundRobin
        } else {
            args.routing.router_mode
        };
        let kv = if delegated {
            KvRouterConfig {
                use_kv_events: false,
                ..kv
            }
        } else {
            kv
        };
        let listener = bind(&args.http.http_host, args.http.http_port).await?;
        let mut handle = start_frontend(
            node,
            endpoint.clone(),
            model.clone(),
            pre,
            RoutingConfig {
                mode,
                kv,
                thresholds,
                block_size,
                prefill_endpoint: args
                    .routing
                    .prefill_router_endpoint
                    .as_deref()
                    .map(str::parse)
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
                enforce_disagg: args.routing.enforce_disagg,
                migration_limit: args.routing.migration_limit,
            },
            http_options(&args.runtime.endpoint_types, &args.http),
            listener,
        )
        .await
        .map_err(anyhow::Error::msg)?;
        handle
            .frontend
            .set_reasoning_parser(reasoning(&args.runtime));
        let how = if delegated {
            format!("routed by {endpoint}")
        } else {
            format!("router mode {mode}")
        };
        println!(
            "kvrouter frontend: OpenAI API on http://{} — model {model}, {how}",
            handle.addr
        );
        tokio::select! {
            _ = shutdown_signal() => {}
            r = handle.wait() => r.context("HTTP server")?,
        }
        handle.shutdown().await.context("HTTP server")?;
        Ok(())
    })
}

/// `kvrouter mocker`: workers on the runtime, or one stand-in vLLM server (`--openai-port`).
pub fn mocker(args: &MockerArgs) -> anyhow::Result<()> {
    init_tracing();
    let pre = preprocessor(&args.model, None)?;
    let endpoint: EndpointId = args.endpoint.parse().map_err(anyhow::Error::msg)?;
    let s = &args.standin;
    let zmq_events = s.zmq_kv_events_port.map(|port| ZmqEventsConfig {
        host: s.openai_host.clone(),
        port,
        replay_port: s.zmq_replay_port,
        format: s.zmq_event_format.into(),
    });
    let cfg = WorkerConfig {
        engine: args.engine.engine_config(),
        data_parallel_size: args.engine.data_parallel_size,
        model_name: args
            .model
            .model_name
            .clone()
            .unwrap_or_else(|| "mock-model".into()),
        vocab: pre.ordinary_tokens(),
        eos_probability: EOS_PROBABILITY,
        context_length: pre.context_length(),
        durable_kv_events: args.durable_kv_events,
        role: args.disaggregation_mode.into(),
        zmq_events,
        script: script(&pre, args.engine.mock_response_text.as_deref())?.map(Arc::new),
    };
    runtime()?.block_on(async move {
        if let Some(port) = s.openai_port {
            let listener = bind(&s.openai_host, port).await?;
            let graceful = Duration::from_secs_f64(args.graceful_shutdown_timeout);
            let standin = StandIn::start(cfg.clone(), pre, listener, graceful)
                .await
                .map_err(anyhow::Error::msg)?;
            let events: Vec<String> = standin
                .zmq_addresses()
                .iter()
                .map(|(p, r)| match r {
                    Some(r) => format!("{p} (replay {r})"),
                    None => format!("{p} (no replay)"),
                })
                .collect();
            let events = if events.is_empty() {
                ", no KV events".to_string()
            } else {
                format!(
                    ", KV events on {}, {:?} form",
                    events.join(", "),
                    s.zmq_event_format
                )
            };
            println!(
                "kvrouter mocker: stand-in engine for {} on http://{}{events}, block size {}",
                cfg.model_name,
                standin.addr(),
                cfg.engine.block_size
            );
            shutdown_signal().await;
            standin.shutdown().await.context("HTTP server")?;
            return Ok(());
        }
        let node = node(&args.runtime, "0.0.0.0").await?;
        let mut workers = Vec::new();
        for _ in 0..args.num_workers {
            let id = new_instance_id();
            workers.push(service::start(&node, &endpoint, id, cfg.clone()).await?);
            println!("kvrouter mocker: worker {id} serving {endpoint}");
        }
        shutdown_signal().await;
        // Leave discovery first, so routers stop sending; then let what is
        // in flight finish, up to the timeout.
        for w in &mut workers {
            w.deregister().await;
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs_f64(args.graceful_shutdown_timeout);
        let in_flight =
            |ws: &[service::MockWorker]| ws.iter().map(|w| w.in_flight()).sum::<usize>();
        while in_flight(&workers) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cut = in_flight(&workers);
        if cut > 0 {
            eprintln!(
                "kvrouter mocker: {cut} requests still running at the shutdown timeout are cut"
            );
        }
        drop(workers);
        Ok(())
    })
}

/// `kvrouter engine`: the sidecar of one external engine.
pub fn engine(args: &EngineCmdArgs) -> anyhow::Result<()> {
    init_tracing();
    let spec = args.spec().map_err(anyhow::Error::msg)?;
    let endpoint: EndpointId = args.endpoint.parse().map_err(anyhow::Error::msg)?;
    runtime()?.block_on(async move {
        let node = node(&args.runtime, "0.0.0.0").await?;
        let cfg = SidecarConfig {
            spec: spec.clone(),
            endpoint: endpoint.clone(),
            model_name: args.model_name.clone(),
            block_size: args.engine_block_size,
            startup_timeout: Duration::from_secs(60),
        };
        let sidecar = Sidecar::start(node, cfg, new_instance_id())
            .await
            .map_err(anyhow::Error::msg)?;
        println!(
            "kvrouter engine: {} ({}) registered as instance {} of {endpoint}; KV events from {}",
            spec.base(),
            sidecar.model,
            sidecar.id,
            if sidecar.events.is_empty() {
                "nowhere (none advertised)".to_string()
            } else {
                sidecar.events.join(", ")
            }
        );
        shutdown_signal().await;
        sidecar.deregister().await;
        Ok(())
    })
}

/// Serves `registry` at `http://0.0.0.0:$DYN_SYSTEM_PORT/metrics` when that
/// variable is set (as Dynamo's components do; unset or -1 means off).
async fn system_metrics(registry: prometheus::Registry, r: &RuntimeArgs) -> anyhow::Result<()> {
    let Some(port) = r.env.system_port.as_deref() else {
        return Ok(());
    };
    let port: i32 = port
        .parse()
        .with_context(|| format!("DYN_SYSTEM_PORT={port:?} is not a port"))?;
    if port < 0 {
        return Ok(());
    }
    let listener = bind("0.0.0.0", port as u16).await?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                use kvrouter_router::metrics::{PROMETHEUS_CONTENT_TYPE, prometheus_text};
                match prometheus_text(&registry) {
                    Ok(text) => Ok((
                        [(axum::http::header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
                        text,
                    )),
                    Err(e) => Err((
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        format!("metrics encoding: {e}"),
                    )),
                }
            }
        }),
    );
    eprintln!(
        "metrics on http://{}/metrics",
        listener.local_addr().context("metrics listener")?
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// `kvrouter router`: the standalone router for `--endpoint`'s workers.
pub fn router(args: &RouterArgs, kv: KvRouterConfig) -> anyhow::Result<()> {
    init_tracing();
    let endpoint: EndpointId = args.endpoint.parse().map_err(anyhow::Error::msg)?;
    runtime()?.block_on(async move {
        let node = node(&args.runtime, "0.0.0.0").await?;
        let registry = prometheus::Registry::new();
        let metrics = RouterMetrics::new(&registry)?;
        // Busy thresholds are the frontend's admission control; the standalone
        // router routes among whatever workers exist.
        let router = KvRouter::new(
            RouterMode::Kv,
            kv,
            args.router_block_size,
            LoadThresholds::default(),
            metrics,
        );
        let cancel = tokio_util::sync::CancellationToken::new();
        let pool = WorkerPool::start(node.clone(), endpoint.clone(), router, cancel.clone())
            .await
            .map_err(anyhow::Error::msg)?;
        let id = new_instance_id();
        // Metrics first: once the router is discoverable, its metrics answer too.
        system_metrics(registry, &args.runtime).await?;
        let service = StandaloneRouter::start(&node, &args.runtime.namespace, id, pool).await?;
        println!(
            "kvrouter router: instance {id} serving {} and {} for {endpoint} (block size {})",
            service.generate.instance.endpoint,
            service.best_worker_id.instance.endpoint,
            args.router_block_size
        );
        shutdown_signal().await;
        let grace = Duration::from_secs_f64(args.graceful_shutdown_timeout);
        let cut = service.stop(grace).await;
        if cut > 0 {
            eprintln!(
                "kvrouter router: {cut} requests still running at the shutdown timeout are cut"
            );
        }
        cancel.cancel();
        Ok(())
    })
}

/// `kvrouter call`: exit 0 on a complete stream, 1 on an error response, 3
/// when no instance appears in time.
pub fn call(args: &CallArgs) -> anyhow::Result<ExitCode> {
    let endpoint: EndpointId = args.endpoint.parse().map_err(anyhow::Error::msg)?;
    let body = match args.body.as_deref() {
        None => "{}".to_string(),
        Some("-") => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("reading the request body from stdin")?;
            s
        }
        Some(b) => b.to_string(),
    };
    serde_json::from_str::<serde_json::Value>(&body).context("the request body is not JSON")?;
    runtime()?.block_on(async move {
        let node = node(&args.runtime, "127.0.0.1").await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.wait);
        let instance = loop {
            let found = node.discovery.list(&endpoint).await?;
            let pick = match args.instance {
                Some(id) => found.into_iter().find(|i| i.id == id),
                None => found.into_iter().next(),
            };
            if let Some(i) = pick {
                break i;
            }
            if tokio::time::Instant::now() >= deadline {
                eprintln!(
                    "kvrouter call: no instance of {endpoint} within {} s",
                    args.wait
                );
                return Ok(ExitCode::from(3));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut responses = match node.call(&instance.address, body.into_bytes().into()).await {
            Ok(r) => r,
            Err(e) => {
                println!("{}", serde_json::json!({"error": e.to_string()}));
                return Ok(ExitCode::FAILURE);
            }
        };
        while let Some(item) = responses.next().await {
            match item {
                Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
                    Ok(v) => println!("{v}"),
                    Err(_) => println!(
                        "{}",
                        serde_json::Value::String(String::from_utf8_lossy(&bytes).into())
                    ),
                },
                Err(e) => {
                    let err = match &e {
                        kvrouter_runtime::request::RequestError::Remote(m) => {
                            serde_json::from_str(m).unwrap_or_else(|_| serde_json::json!(m))
                        }
                        other => serde_json::json!(other.to_string()),
                    };
                    println!("{}", serde_json::json!({"error": err}));
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `kvrouter global-router`.
pub fn global_router(args: &GlobalRouterArgs) -> anyhow::Result<()> {
    init_tracing();
    let pools = PoolConfig::load(&args.config)?;
    runtime()?.block_on(async move {
        let node = node(&args.runtime, "0.0.0.0").await?;
        let registry = prometheus::Registry::new();
        let id = new_instance_id();
        system_metrics(registry.clone(), &args.runtime).await?;
        let service = GlobalRouter::start(
            &node,
            &args.runtime.namespace,
            &args.component_name,
            id,
            GlobalRouterConfig {
                pools,
                model_name: args.model_name.clone(),
                default_ttft_target: args.default_ttft_target,
                default_itl_target: args.default_itl_target,
            },
            &registry,
        )
        .await?;
        println!(
            "kvrouter global-router: instance {id} serving {} and {} for model {}",
            service.generate.instance.endpoint, service.prefill.instance.endpoint, args.model_name
        );
        shutdown_signal().await;
        // Leave discovery before stopping, so frontends stop sending at once.
        let mut service = service;
        service.generate.deregister().await;
        service.prefill.deregister().await;
        Ok(())
    })
}
