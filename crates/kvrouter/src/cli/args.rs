//! Flag groups shared by the subcommands, as clap derives them.
//!
//! Field names are the argument ids, chosen to equal the reference's
//! `KvRouterConfig` fields where one exists, so the environment table, the
//! validation messages and `--dump-config-to` all speak the same names.
//! Negatable switches are two flags (`--kv-events` / `--no-kv-events`) that
//! override each other; the last one given wins.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use kvrouter_core::RouterMode;
use kvrouter_core::queue::QueuePolicy;
use serde::Serialize;

/// Where instances register and are discovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKv {
    /// etcd, with leases (a fleet).
    Etcd,
    /// A directory shared by the processes of one host.
    File,
    /// In-process (one process runs everything).
    Mem,
}

/// How requests reach workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RequestPlane {
    /// Multiplexed TCP streams.
    Tcp,
    /// NATS request subjects.
    Nats,
    /// HTTP POST with a streamed body.
    Http,
}

/// How KV events and load travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventPlane {
    /// NATS subjects (JetStream when durable).
    Nats,
    /// ZeroMQ PUB/SUB.
    Zmq,
}

/// KV transfer connectors a worker may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Connector {
    /// NVIDIA NIXL.
    Nixl,
    /// LMCache.
    Lmcache,
    /// Dynamo's KV block manager.
    Kvbm,
    /// The null connector.
    Null,
    /// No connector.
    None,
}

/// OpenAI endpoint families a model is served on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointType {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

/// A mock worker's part in disaggregated serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DisaggregationMode {
    /// Prefill and decode.
    Agg,
    /// Prefill only (answers one token and the KV transfer parameters).
    Prefill,
    /// Decode (receives the prompt's KV from a prefill worker).
    Decode,
}

impl From<DisaggregationMode> for kvrouter_mocker::service::Role {
    fn from(m: DisaggregationMode) -> Self {
        match m {
            DisaggregationMode::Agg => Self::Aggregated,
            DisaggregationMode::Prefill => Self::Prefill,
            DisaggregationMode::Decode => Self::Decode,
        }
    }
}

/// Tool-call output parsers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum ToolCallParser {
    /// `<tool_call>{json}</tool_call>` (Hermes, Qwen).
    Hermes,
    /// `[TOOL_CALLS][...]` (Mistral).
    Mistral,
    /// A bare JSON object (Llama 3).
    Llama3Json,
    /// Python call syntax.
    Pythonic,
}

/// Reasoning-content parsers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum ReasoningParser {
    /// `<think>…</think>` with an implicit opening tag (DeepSeek-R1).
    DeepseekR1,
    /// `<think>…</think>`.
    Basic,
    /// Qwen3 thinking mode.
    Qwen3,
}

/// `--namespace`, discovery, planes and the other process-wide settings.
#[derive(Debug, Clone, Args, Serialize)]
pub struct RuntimeArgs {
    /// Namespace instances register under.
    #[arg(long, default_value = "dynamo", help_heading = "Runtime")]
    pub namespace: String,
    /// Discovery store [default: mem for `serve`, etcd otherwise].
    #[arg(long, value_enum, help_heading = "Runtime")]
    pub store_kv: Option<StoreKv>,
    /// Request transport.
    #[arg(long, value_enum, default_value_t = RequestPlane::Tcp, help_heading = "Runtime")]
    pub request_plane: RequestPlane,
    /// Event transport.
    #[arg(long, value_enum, default_value_t = EventPlane::Nats, help_heading = "Runtime")]
    pub event_plane: EventPlane,
    /// KV transfer connectors: not implemented, only `none` / `null` accepted.
    #[arg(long, value_enum, value_delimiter = ',', num_args = 1.., help_heading = "Runtime")]
    pub connector: Vec<Connector>,
    /// Tool-call parser: not implemented, refused (the engine parses).
    #[arg(long, value_enum, help_heading = "Runtime")]
    pub dyn_tool_call_parser: Option<ToolCallParser>,
    /// Reasoning parser for chat answers kvrouter renders (`frontend`, `serve`
    /// over mock or token-level workers): `reasoning_content` beside `content`.
    /// Not with --engine: there the engine's own parser applies.
    #[arg(long, value_enum, help_heading = "Runtime")]
    pub dyn_reasoning_parser: Option<ReasoningParser>,
    /// Jinja chat template replacing the model's.
    #[arg(long, value_name = "FILE", help_heading = "Runtime")]
    pub custom_jinja_template: Option<PathBuf>,
    /// Endpoint families to serve (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', num_args = 1.., default_values_t = [EndpointType::Chat, EndpointType::Completions], help_heading = "Runtime")]
    pub endpoint_types: Vec<EndpointType>,
    /// Write the resolved configuration (with where each value came from) as JSON.
    #[arg(long, value_name = "FILE", help_heading = "Runtime")]
    pub dump_config_to: Option<PathBuf>,
    /// Validate the configuration (and write `--dump-config-to`), then exit without starting.
    #[arg(long, help_heading = "Runtime")]
    pub check_config: bool,
    /// The settings only the environment gives (`ETCD_ENDPOINTS`, `NATS_SERVER`, …),
    /// from the same injected environment as the flags.
    #[arg(skip)]
    #[serde(skip)]
    pub env: super::runtime::RuntimeEnv,
}

/// The KV router's knobs (`KvRouterConfig`).
#[derive(Debug, Clone, Args, Serialize)]
pub struct KvArgs {
    /// Weight of prefill blocks in the cost; 0 = load balancing only.
    #[arg(
        allow_negative_numbers = true,
        long = "kv-overlap-score-weight",
        visible_alias = "router-kv-overlap-score-weight",
        default_value_t = 1.0,
        help_heading = "KV router"
    )]
    pub overlap_score_weight: f64,
    /// Softmax temperature over costs; 0 = always the cheapest worker.
    #[arg(
        allow_negative_numbers = true,
        long,
        default_value_t = 0.0,
        help_heading = "KV router"
    )]
    pub router_temperature: f64,
    /// Follow workers' KV events (default).
    #[arg(
        long,
        visible_alias = "router-kv-events",
        overrides_with = "no_kv_events",
        help_heading = "KV router"
    )]
    #[serde(skip)]
    pub kv_events: bool,
    /// Predict caches from routing decisions instead (TTL + pruning).
    #[arg(
        long,
        visible_alias = "no-router-kv-events",
        overrides_with = "kv_events",
        help_heading = "KV router"
    )]
    #[serde(skip)]
    pub no_kv_events: bool,
    /// Consume KV events from a durable JetStream stream.
    #[arg(
        long,
        visible_alias = "router-durable-kv-events",
        help_heading = "KV router"
    )]
    pub durable_kv_events: bool,
    /// Share active sequences with other router replicas.
    #[arg(long, help_heading = "KV router")]
    pub router_replica_sync: bool,
    /// Durable mode: stream messages that trigger an index snapshot.
    #[arg(long, default_value_t = 1_000_000, help_heading = "KV router")]
    pub router_snapshot_threshold: u32,
    /// Durable mode: purge the stream and snapshot at start-up.
    #[arg(long, help_heading = "KV router")]
    pub router_reset_states: bool,
    /// Track decode load per worker (default).
    #[arg(
        long,
        visible_alias = "router-track-active-blocks",
        overrides_with = "no_track_active_blocks",
        help_heading = "KV router"
    )]
    #[serde(skip)]
    pub track_active_blocks: bool,
    /// Do not track decode load (prefill-only routers).
    #[arg(
        long,
        overrides_with = "track_active_blocks",
        help_heading = "KV router"
    )]
    #[serde(skip)]
    pub no_track_active_blocks: bool,
    /// Count generated output blocks in the decode load.
    #[arg(
        long = "track-output-blocks",
        visible_alias = "router-track-output-blocks",
        help_heading = "KV router"
    )]
    pub router_track_output_blocks: bool,
    /// Count shared prefixes once per worker (default).
    #[arg(
        long,
        visible_alias = "router-assume-kv-reuse",
        overrides_with = "no_assume_kv_reuse",
        help_heading = "KV router"
    )]
    #[serde(skip)]
    pub assume_kv_reuse: bool,
    /// Count every request's blocks separately.
    #[arg(long, overrides_with = "assume_kv_reuse", help_heading = "KV router")]
    #[serde(skip)]
    pub no_assume_kv_reuse: bool,
    /// Approximate mode: how long a routed prefix is assumed cached (`120`, `90s`, `2m`).
    #[arg(allow_negative_numbers = true, long = "router-ttl", visible_alias = "router-ttl-secs", value_name = "DURATION", default_value = "120", value_parser = parse_secs, help_heading = "KV router")]
    pub router_ttl_secs: f64,
    /// Approximate mode: blocks held before pruning.
    #[arg(long, default_value_t = 1 << 20, help_heading = "KV router")]
    pub router_max_tree_size: usize,
    /// Approximate mode: fraction of the cap to prune down to.
    #[arg(
        allow_negative_numbers = true,
        long,
        default_value_t = 0.8,
        help_heading = "KV router"
    )]
    pub router_prune_target_ratio: f64,
    /// Threads applying KV events.
    #[arg(long, default_value_t = 1, help_heading = "KV router")]
    pub router_event_threads: u32,
    /// kv-sticky: a worker keeps its prefix families while its cost is within
    /// (1 + this) × the mean cost plus one request.
    #[arg(long, default_value_t = kvrouter_core::sticky::DEFAULT_SPILL, allow_negative_numbers = true, help_heading = "KV router")]
    pub router_sticky_spill: f64,
    /// kv-sticky: how much further above the mean a worker caching the whole
    /// prompt may run (scaled by the fraction it caches).
    #[arg(long, default_value_t = kvrouter_core::sticky::DEFAULT_STAKE, allow_negative_numbers = true, help_heading = "KV router")]
    pub router_sticky_stake: f64,
}

/// The router queue (frontend only).
#[derive(Debug, Clone, Args, Serialize)]
pub struct QueueArgs {
    /// Hold requests while every worker has more than this × max_num_batched_tokens queued.
    #[arg(allow_negative_numbers = true, long, help_heading = "KV router")]
    pub router_queue_threshold: Option<f64>,
    /// Order in which held requests are released: fcfs (arrival, moved earlier by
    /// nvext.agent_hints.latency_sensitivity seconds) or wspt (shortest prompt first).
    #[arg(long, value_enum, default_value_t = QueuePolicy::Fcfs, help_heading = "KV router")]
    pub router_queue_policy: QueuePolicy,
}

/// Busy thresholds: workers over them are skipped; all over → 503.
#[derive(Debug, Clone, Args, Serialize)]
pub struct BusyArgs {
    /// Busy when active decode blocks exceed this fraction of the KV blocks (0–1).
    #[arg(allow_negative_numbers = true, long, help_heading = "Busy thresholds")]
    pub active_decode_blocks_threshold: Option<f64>,
    /// Busy when queued prefill tokens exceed this many.
    #[arg(long, help_heading = "Busy thresholds")]
    pub active_prefill_tokens_threshold: Option<u64>,
    /// Busy when queued prefill tokens exceed this × max_num_batched_tokens.
    #[arg(allow_negative_numbers = true, long, help_heading = "Busy thresholds")]
    pub active_prefill_tokens_threshold_frac: Option<f64>,
}

/// The HTTP listener.
#[derive(Debug, Clone, Args, Serialize)]
pub struct HttpArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0", help_heading = "HTTP")]
    pub http_host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000, help_heading = "HTTP")]
    pub http_port: u16,
    /// Longest wait for a request's headers, and for the next request on an
    /// idle keep-alive connection; a slower client is disconnected.
    #[arg(long, value_name = "DURATION", default_value = "10", value_parser = parse_positive_secs, help_heading = "HTTP")]
    pub http_header_timeout: f64,
    /// Longest wait for a request's body (a slower one gets 408).
    #[arg(long, value_name = "DURATION", default_value = "30", value_parser = parse_positive_secs, help_heading = "HTTP")]
    pub http_body_timeout: f64,
    /// Largest request body in bytes (a larger one gets 413).
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 20, value_parser = clap::value_parser!(u64).range(1..), help_heading = "HTTP")]
    pub http_max_body_bytes: u64,
    /// Connections served at once; past it a client gets 503 [default: half
    /// the open-file limit, which is raised to its hard maximum first].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), help_heading = "HTTP")]
    pub http_max_connections: Option<u64>,
    /// On SIGTERM or SIGINT: how long in-flight requests may run before they
    /// are ended with an error (new connections are refused at once).
    #[arg(long, value_name = "DURATION", default_value = "30", value_parser = parse_secs, help_heading = "HTTP")]
    pub graceful_shutdown_timeout: f64,
    /// Longest time a request may take, its whole answer included: past it a
    /// stream ends with an error event, a unary request gets 504.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_positive_secs, help_heading = "HTTP")]
    pub request_timeout: f64,
    /// Longest wait for a request's first response from its worker or engine
    /// (queueing, routing and prefill included): past it, 504.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_positive_secs, help_heading = "HTTP")]
    pub ttft_timeout: f64,
}

/// The model served.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ModelArgs {
    /// Model name clients ask for [default: mock-model for `mocker`/`serve`].
    #[arg(long, help_heading = "Model")]
    pub model_name: Option<String>,
    /// Directory with tokenizer.json (and tokenizer_config.json).
    #[arg(long, value_name = "DIR", help_heading = "Model")]
    pub model_path: Option<PathBuf>,
    /// Longest prompt plus output, in tokens; longer prompts get 400
    /// `context_length_exceeded` [default: the tokenizer's `model_max_length`,
    /// else 32768].
    #[arg(long, value_name = "TOKENS", help_heading = "Model")]
    pub context_length: Option<u32>,
}

/// How the frontend routes.
#[derive(Debug, Clone, Args, Serialize)]
pub struct RoutingArgs {
    /// Routing policy.
    #[arg(long, value_enum, default_value_t = RouterMode::RoundRobin, help_heading = "Routing")]
    pub router_mode: RouterMode,
    /// KV block size in tokens [default: the workers' own].
    #[arg(long, help_heading = "Routing")]
    pub kv_cache_block_size: Option<u32>,
    /// Times a stream whose worker fails mid-generation may continue on another
    /// worker, as a new request of the prompt plus the tokens generated so far
    /// (0: never; the client then gets an error event). Before the first token a
    /// failed worker is always skipped. Not with --engine: a passthrough answer
    /// cannot move once it has started.
    #[arg(long, default_value_t = 0, help_heading = "Routing")]
    pub migration_limit: u32,
    /// Refuse aggregated serving when a prefill pool exists but is down.
    #[arg(long, help_heading = "Routing")]
    pub enforce_disagg: bool,
    /// Route through this standalone or global router (`ns.router.generate`,
    /// `ns.global_router.generate`) instead of the frontend's own KV router.
    #[arg(long, value_name = "ENDPOINT", help_heading = "Routing")]
    pub router_endpoint: Option<String>,
    /// Disaggregated serving: prefill each request through this router
    /// (`ns.router.generate` over prefill workers) before decoding.
    #[arg(long, value_name = "ENDPOINT", help_heading = "Routing")]
    pub prefill_router_endpoint: Option<String>,
}

/// External engines (`frontend`, `serve`).
#[derive(Debug, Clone, Args, Serialize)]
pub struct EngineSetArgs {
    /// An OpenAI-compatible engine to route to (vLLM, SGLang, trtllm-serve):
    /// `URL[,kv-events=tcp://HOST:PORT][,replay=tcp://HOST:PORT][,dp-size=N]`; repeat
    /// for each engine (in the environment, separate them with spaces). Rank r's
    /// events are on PORT + r. Without kv-events= the ports are asked of the engine
    /// (/kv_event_sources, /server_info); engines without events are routed
    /// approximately. Requests are forwarded unchanged, so migration is possible
    /// only before the first byte. `serve` starts no mock worker when any is given.
    #[arg(long = "engine", id = "engines", value_name = "URL[,OPTS]", value_delimiter = ' ', value_parser = parse_engine, help_heading = "Engines")]
    pub engines: Vec<kvrouter_engines::EngineSpec>,
}

fn parse_engine(s: &str) -> Result<kvrouter_engines::EngineSpec, String> {
    s.parse()
}

/// How events are written by a stand-in engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ZmqEventFormat {
    /// `{"type": …}` maps (vLLM ≥ 0.24, SGLang ≥ 0.5.20).
    Map,
    /// Tag-first arrays (vLLM ≤ 0.23, SGLang ≤ 0.5.19).
    Array,
}

impl From<ZmqEventFormat> for kvrouter_engines::publisher::EventFormat {
    fn from(f: ZmqEventFormat) -> Self {
        match f {
            ZmqEventFormat::Map => Self::Map,
            ZmqEventFormat::Array => Self::Array,
        }
    }
}

/// The mocker as a stand-in vLLM server.
#[derive(Debug, Clone, Args, Serialize)]
pub struct StandInArgs {
    /// Serve the OpenAI API on this port, as a vLLM server would (one engine per
    /// process, no discovery or NATS needed).
    #[arg(long, value_name = "PORT", help_heading = "Stand-in engine")]
    pub openai_port: Option<u16>,
    /// Address the stand-in's HTTP and ZeroMQ sockets bind.
    #[arg(long, default_value = "0.0.0.0", help_heading = "Stand-in engine")]
    pub openai_host: String,
    /// Publish KV events as vLLM does on ZeroMQ PUB port PORT (+ rank).
    #[arg(long, value_name = "PORT", help_heading = "Stand-in engine")]
    pub zmq_kv_events_port: Option<u16>,
    /// Replay buffered events on ZeroMQ ROUTER port PORT (+ rank).
    #[arg(long, value_name = "PORT", help_heading = "Stand-in engine")]
    pub zmq_replay_port: Option<u16>,
    /// Event encoding: map (vLLM ≥ 0.24) or array (older vLLM).
    #[arg(long, value_enum, default_value_t = ZmqEventFormat::Map, help_heading = "Stand-in engine")]
    pub zmq_event_format: ZmqEventFormat,
}

/// The simulated engine (`mocker`, `serve`).
#[derive(Debug, Clone, Args, Serialize)]
pub struct EngineArgs {
    /// KV blocks per worker rank.
    #[arg(
        long,
        visible_alias = "num-gpu-blocks-override",
        default_value_t = 16384,
        help_heading = "Mock engine"
    )]
    pub num_gpu_blocks: u64,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 64, help_heading = "Mock engine")]
    pub block_size: u32,
    /// A testing aid: every answer is this text (tokenized, then a stop)
    /// instead of sampled tokens; for trying parsers end to end.
    #[arg(long, value_name = "TEXT", help_heading = "Mock engine")]
    pub mock_response_text: Option<String>,
    /// Requests running at once per rank.
    #[arg(long, default_value_t = 256, help_heading = "Mock engine")]
    pub max_num_seqs: u32,
    /// Tokens per forward pass.
    #[arg(long, default_value_t = 8192, help_heading = "Mock engine")]
    pub max_num_batched_tokens: u32,
    /// Reuse cached prefixes (default).
    #[arg(
        long,
        overrides_with = "no_enable_prefix_caching",
        help_heading = "Mock engine"
    )]
    #[serde(skip)]
    pub enable_prefix_caching: bool,
    /// Never reuse cached prefixes.
    #[arg(
        long,
        overrides_with = "enable_prefix_caching",
        help_heading = "Mock engine"
    )]
    #[serde(skip)]
    pub no_enable_prefix_caching: bool,
    /// Split long prefills across forward passes (default).
    #[arg(
        long,
        overrides_with = "no_enable_chunked_prefill",
        help_heading = "Mock engine"
    )]
    #[serde(skip)]
    pub enable_chunked_prefill: bool,
    /// Prefill each prompt in one pass.
    #[arg(
        long,
        overrides_with = "enable_chunked_prefill",
        help_heading = "Mock engine"
    )]
    #[serde(skip)]
    pub no_enable_chunked_prefill: bool,
    /// Fraction of KV blocks kept free when admitting requests.
    #[arg(
        allow_negative_numbers = true,
        long,
        default_value_t = 0.01,
        help_heading = "Mock engine"
    )]
    pub watermark: f64,
    /// Divide every simulated duration by this.
    #[arg(
        allow_negative_numbers = true,
        long,
        default_value_t = 1.0,
        help_heading = "Mock engine"
    )]
    pub speedup_ratio: f64,
    /// Data-parallel ranks per worker.
    #[arg(long, default_value_t = 1, help_heading = "Mock engine")]
    pub data_parallel_size: u32,
}

impl KvArgs {
    /// The switches, resolved (a negative flag turns its default off).
    pub fn use_kv_events(&self) -> bool {
        !self.no_kv_events
    }
    /// See [`Self::use_kv_events`].
    pub fn track_active_blocks(&self) -> bool {
        !self.no_track_active_blocks
    }
    /// See [`Self::use_kv_events`].
    pub fn assume_kv_reuse(&self) -> bool {
        !self.no_assume_kv_reuse
    }
}

impl EngineArgs {
    /// The engine these flags describe.
    pub fn engine_config(&self) -> kvrouter_mocker::engine::EngineConfig {
        kvrouter_mocker::engine::EngineConfig {
            num_gpu_blocks: self.num_gpu_blocks as usize,
            block_size: self.block_size as usize,
            max_num_seqs: self.max_num_seqs as usize,
            max_num_batched_tokens: self.max_num_batched_tokens as usize,
            enable_prefix_caching: self.enable_prefix_caching(),
            enable_chunked_prefill: self.enable_chunked_prefill(),
            watermark: self.watermark,
            speedup_ratio: self.speedup_ratio,
        }
    }

    /// Resolved switch.
    pub fn enable_prefix_caching(&self) -> bool {
        !self.no_enable_prefix_caching
    }
    /// Resolved switch.
    pub fn enable_chunked_prefill(&self) -> bool {
        !self.no_enable_chunked_prefill
    }
}

/// A duration (as [`parse_secs`]) that must be more than zero.
pub fn parse_positive_secs(s: &str) -> Result<f64, String> {
    match parse_secs(s)? {
        v if v > 0.0 => Ok(v),
        _ => Err(format!("{s:?}: must be more than zero")),
    }
}

/// Seconds from `120`, `120.5`, `90s`, `500ms`, `2m` or `1h`.
pub fn parse_secs(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 120, 90s, 500ms, 2m)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?}: a duration must be a finite number ≥ 0"));
    }
    Ok(v * scale)
}

#[cfg(test)]
mod tests {
    use super::parse_secs;

    #[test]
    fn durations() {
        assert_eq!(parse_secs("120"), Ok(120.0));
        assert_eq!(parse_secs("0.5"), Ok(0.5));
        assert_eq!(parse_secs("90s"), Ok(90.0));
        assert_eq!(parse_secs("250ms"), Ok(0.25));
        assert_eq!(parse_secs("2m"), Ok(120.0));
        assert_eq!(parse_secs("1h"), Ok(3600.0));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("soon").is_err());
    }
}
