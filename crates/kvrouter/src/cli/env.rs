//! Environment variables: the one table of `DYN_*` names, and how they become flags.
//!
//! Every flag that has an environment variable is listed once in [`ENV`], by its
//! argument id, with older spellings as later aliases (the first one set wins).
//! Before clap parses, the variables that are set are turned into flags placed
//! right after the subcommand, so anything on the real command line, which
//! comes later, overrides them: CLI > env > default, with clap's own value
//! checks on both. The environment is read through [`EnvSource`], so tests
//! inject a map and never touch the process environment.

use std::collections::HashMap;

/// Where environment variables are read from.
pub trait EnvSource {
    /// The value of `name`, if set.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl EnvSource for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

/// How a variable maps onto its flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvKind {
    /// `--flag=value`.
    Value,
    /// A switch: truthy → `--flag`; falsy → `--<negative>` when the switch has one.
    Bool {
        /// Argument id of the negative switch (`no_kv_events`), if any.
        negative: Option<&'static str>,
    },
}

/// One environment variable.
#[derive(Debug, Clone, Copy)]
pub struct EnvVar {
    /// Argument id (the clap field name).
    pub arg: &'static str,
    /// Variable names, preferred first.
    pub names: &'static [&'static str],
    /// Value or switch.
    pub kind: EnvKind,
}

const fn value(arg: &'static str, names: &'static [&'static str]) -> EnvVar {
    EnvVar {
        arg,
        names,
        kind: EnvKind::Value,
    }
}

const fn switch(
    arg: &'static str,
    names: &'static [&'static str],
    negative: Option<&'static str>,
) -> EnvVar {
    EnvVar {
        arg,
        names,
        kind: EnvKind::Bool { negative },
    }
}

/// Every environment variable kvrouter reads, by argument id.
pub const ENV: &[EnvVar] = &[
    // Runtime group.
    value("namespace", &["DYN_NAMESPACE"]),
    value("store_kv", &["DYN_STORE_KV", "DYN_DISCOVERY_BACKEND"]),
    value("request_plane", &["DYN_REQUEST_PLANE"]),
    value("event_plane", &["DYN_EVENT_PLANE"]),
    value("connector", &["DYN_CONNECTOR"]),
    value("dyn_tool_call_parser", &["DYN_TOOL_CALL_PARSER"]),
    value("dyn_reasoning_parser", &["DYN_REASONING_PARSER"]),
    value("custom_jinja_template", &["DYN_CUSTOM_JINJA_TEMPLATE"]),
    value("endpoint_types", &["DYN_ENDPOINT_TYPES"]),
    value("dump_config_to", &["DYN_DUMP_CONFIG_TO"]),
    // KV router group.
    value(
        "overlap_score_weight",
        &[
            "DYN_KV_OVERLAP_SCORE_WEIGHT",
            "DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT",
            "DYN_OVERLAP_SCORE_WEIGHT",
        ],
    ),
    value("router_temperature", &["DYN_ROUTER_TEMPERATURE"]),
    switch(
        "kv_events",
        &[
            "DYN_KV_EVENTS",
            "DYN_ROUTER_USE_KV_EVENTS",
            "DYN_USE_KV_EVENTS",
        ],
        Some("no_kv_events"),
    ),
    switch(
        "durable_kv_events",
        &["DYN_DURABLE_KV_EVENTS", "DYN_ROUTER_DURABLE_KV_EVENTS"],
        None,
    ),
    switch("router_replica_sync", &["DYN_ROUTER_REPLICA_SYNC"], None),
    value(
        "router_snapshot_threshold",
        &["DYN_ROUTER_SNAPSHOT_THRESHOLD"],
    ),
    switch("router_reset_states", &["DYN_ROUTER_RESET_STATES"], None),
    switch(
        "track_active_blocks",
        &["DYN_ROUTER_TRACK_ACTIVE_BLOCKS"],
        Some("no_track_active_blocks"),
    ),
    switch(
        "router_track_output_blocks",
        &["DYN_ROUTER_TRACK_OUTPUT_BLOCKS"],
        None,
    ),
    switch(
        "assume_kv_reuse",
        &["DYN_ROUTER_ASSUME_KV_REUSE"],
        Some("no_assume_kv_reuse"),
    ),
    value(
        "router_ttl_secs",
        &["DYN_ROUTER_TTL", "DYN_ROUTER_TTL_SECS"],
    ),
    value("router_max_tree_size", &["DYN_ROUTER_MAX_TREE_SIZE"]),
    value(
        "router_prune_target_ratio",
        &["DYN_ROUTER_PRUNE_TARGET_RATIO"],
    ),
    value("router_event_threads", &["DYN_ROUTER_EVENT_THREADS"]),
    value("router_sticky_spill", &["DYN_ROUTER_STICKY_SPILL"]),
    value("router_sticky_stake", &["DYN_ROUTER_STICKY_STAKE"]),
    value("router_queue_threshold", &["DYN_ROUTER_QUEUE_THRESHOLD"]),
    value("router_queue_policy", &["DYN_ROUTER_QUEUE_POLICY"]),
    // Busy thresholds.
    value(
        "active_decode_blocks_threshold",
        &["DYN_ACTIVE_DECODE_BLOCKS_THRESHOLD"],
    ),
    value(
        "active_prefill_tokens_threshold",
        &["DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD"],
    ),
    value(
        "active_prefill_tokens_threshold_frac",
        &["DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC"],
    ),
    // Frontend.
    value("http_host", &["DYN_HTTP_HOST"]),
    value("http_port", &["DYN_HTTP_PORT"]),
    value("http_header_timeout", &["DYN_HTTP_HEADER_TIMEOUT"]),
    value("http_body_timeout", &["DYN_HTTP_BODY_TIMEOUT"]),
    value("http_max_body_bytes", &["DYN_HTTP_MAX_BODY_BYTES"]),
    value("http_max_connections", &["DYN_HTTP_MAX_CONNECTIONS"]),
    value("request_timeout", &["DYN_REQUEST_TIMEOUT"]),
    value("ttft_timeout", &["DYN_TTFT_TIMEOUT"]),
    value(
        "graceful_shutdown_timeout",
        &["DYN_GRACEFUL_SHUTDOWN_TIMEOUT"],
    ),
    value("router_mode", &["DYN_ROUTER_MODE"]),
    value("kv_cache_block_size", &["DYN_KV_CACHE_BLOCK_SIZE"]),
    value("model_name", &["DYN_MODEL_NAME"]),
    value("model_path", &["DYN_MODEL_PATH"]),
    value("context_length", &["DYN_CONTEXT_LENGTH"]),
    value("mock_response_text", &["DYN_MOCK_RESPONSE_TEXT"]),
    value("migration_limit", &["DYN_MIGRATION_LIMIT"]),
    switch("enforce_disagg", &["DYN_ENFORCE_DISAGG"], None),
    // Standalone router.
    value("endpoint", &["DYN_ENDPOINT"]),
    value("router_block_size", &["DYN_ROUTER_BLOCK_SIZE"]),
    // Global router.
    value("config", &["DYN_GLOBAL_ROUTER_CONFIG"]),
    value("component_name", &["DYN_COMPONENT_NAME"]),
    value("default_ttft_target", &["DYN_DEFAULT_TTFT_TARGET"]),
    value("default_itl_target", &["DYN_DEFAULT_ITL_TARGET"]),
    // Mocker engine.
    value("num_gpu_blocks", &["DYN_MOCKER_NUM_GPU_BLOCKS"]),
    value("block_size", &["DYN_MOCKER_BLOCK_SIZE"]),
    value("max_num_seqs", &["DYN_MOCKER_MAX_NUM_SEQS"]),
    value(
        "max_num_batched_tokens",
        &["DYN_MOCKER_MAX_NUM_BATCHED_TOKENS"],
    ),
    switch(
        "enable_prefix_caching",
        &["DYN_MOCKER_ENABLE_PREFIX_CACHING"],
        Some("no_enable_prefix_caching"),
    ),
    switch(
        "enable_chunked_prefill",
        &["DYN_MOCKER_ENABLE_CHUNKED_PREFILL"],
        Some("no_enable_chunked_prefill"),
    ),
    value("watermark", &["DYN_MOCKER_WATERMARK"]),
    value("speedup_ratio", &["DYN_MOCKER_SPEEDUP_RATIO"]),
    value("data_parallel_size", &["DYN_MOCKER_DATA_PARALLEL_SIZE"]),
    value("num_workers", &["DYN_MOCKER_NUM_WORKERS"]),
    value("workers", &["DYN_SERVE_WORKERS"]),
    // External engines and the stand-in engine.
    value("engines", &["DYN_ENGINES"]),
    value("engine_url", &["DYN_ENGINE_URL"]),
    value("engine_kv_events", &["DYN_ENGINE_KV_EVENTS"]),
    value("engine_replay", &["DYN_ENGINE_REPLAY"]),
    value("engine_dp_size", &["DYN_ENGINE_DP_SIZE"]),
    value("engine_block_size", &["DYN_ENGINE_BLOCK_SIZE"]),
    value("openai_port", &["DYN_MOCKER_OPENAI_PORT"]),
    value("openai_host", &["DYN_MOCKER_OPENAI_HOST"]),
    value("zmq_kv_events_port", &["DYN_MOCKER_ZMQ_KV_EVENTS_PORT"]),
    value("zmq_replay_port", &["DYN_MOCKER_ZMQ_REPLAY_PORT"]),
    value("zmq_event_format", &["DYN_MOCKER_ZMQ_EVENT_FORMAT"]),
    // Simulator.
    value("trace", &["DYN_SIM_TRACE"]),
    value("sim_workers", &["DYN_SIM_WORKERS"]),
    value("sim_router_mode", &["DYN_SIM_ROUTER_MODE"]),
    value("speedup", &["DYN_SIM_SPEEDUP"]),
    value("limit", &["DYN_SIM_LIMIT"]),
    value("json", &["DYN_SIM_JSON"]),
    value("plot", &["DYN_SIM_PLOT"]),
    value("seed", &["DYN_SIM_SEED"]),
    switch("no_progress", &["DYN_NO_PROGRESS"], None),
];

/// The table entry for an argument id.
pub fn lookup(arg: &str) -> Option<&'static EnvVar> {
    ENV.iter().find(|e| e.arg == arg)
}

/// Parses a boolean the way operators write them.
pub fn truthy(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_no_duplicate_ids_or_names() {
        let mut ids = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for e in ENV {
            assert!(ids.insert(e.arg), "duplicate id {}", e.arg);
            for n in e.names {
                assert!(n.starts_with("DYN_"), "{n}");
                assert!(names.insert(*n), "duplicate name {n}");
            }
        }
    }

    #[test]
    fn booleans() {
        for t in ["1", "true", "TRUE", "yes", "on"] {
            assert_eq!(truthy(t), Some(true));
        }
        for f in ["0", "false", "No", "off", ""] {
            assert_eq!(truthy(f), Some(false));
        }
        assert_eq!(truthy("maybe"), None);
    }
}
