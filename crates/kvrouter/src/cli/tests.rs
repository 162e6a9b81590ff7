//! Every flag and every environment variable, through an injected environment.

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};

use super::env::{ENV, EnvKind};
use super::*;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Required flags of each subcommand, so a row can test one flag alone.
fn base(sub: &str) -> Vec<&'static str> {
    match sub {
        "router" => vec!["--endpoint", "dynamo.backend.generate"],
        "global-router" => vec!["--config", "tests/pools.json", "--model-name", "m"],
        "sim" => vec!["--trace", "Cargo.toml"],
        "engine" => vec!["--url", "http://127.0.0.1:8101"],
        "synth-trace" => vec!["--shape", "sessions", "--out", "t.jsonl"],
        _ => vec![],
    }
}

fn run(sub: &str, tail: &[&str], e: &HashMap<String, String>) -> (Parsed, Value) {
    run_without(sub, tail, e, "")
}

/// Like [`run`], leaving `skip` (an argument id) out of the required base flags.
fn run_without(
    sub: &str,
    tail: &[&str],
    e: &HashMap<String, String>,
    skip: &str,
) -> (Parsed, Value) {
    let mut argv = vec!["kvrouter", sub];
    // The skipped argument's own spelling (its long flag need not match its id).
    let flag = command()
        .find_subcommand(sub)
        .and_then(|c| {
            c.get_arguments()
                .find(|a| a.get_id() == skip)
                .and_then(|a| a.get_long())
        })
        .map_or_else(
            || format!("--{}", skip.replace('_', "-")),
            |l| format!("--{l}"),
        );
    for pair in base(sub).chunks(2) {
        if pair[0] != flag {
            argv.extend(pair);
        }
    }
    argv.extend(tail);
    let parsed = parse(argv.clone(), e).unwrap_or_else(|err| panic!("{argv:?}: {}", err.message));
    let resolved = parsed
        .resolve()
        .unwrap_or_else(|p| panic!("{argv:?}: {p:?}"));
    let dump = parsed.dump(&resolved);
    (parsed, dump)
}

/// A resolved value by key, wherever the dump keeps it.
fn value(dump: &Value, key: &str) -> Value {
    for section in ["kv_router_config", "busy_thresholds", "settings"] {
        if let Some(v) = dump[section].get(key) {
            return v.clone();
        }
    }
    panic!("no key {key} in {dump}")
}

/// (arg id, subcommand, CLI tokens, key in the dump, expected value).
fn flag_rows() -> Vec<(
    &'static str,
    &'static str,
    Vec<&'static str>,
    &'static str,
    Value,
)> {
    vec![
        (
            "check_config",
            "frontend",
            vec!["--check-config"],
            "check_config",
            json!(true),
        ),
        (
            "http_host",
            "frontend",
            vec!["--http-host", "127.0.0.1"],
            "http_host",
            json!("127.0.0.1"),
        ),
        (
            "http_port",
            "frontend",
            vec!["--http-port", "9000"],
            "http_port",
            json!(9000),
        ),
        (
            "http_header_timeout",
            "frontend",
            vec!["--http-header-timeout", "5s"],
            "http_header_timeout",
            json!(5.0),
        ),
        (
            "http_body_timeout",
            "frontend",
            vec!["--http-body-timeout", "500ms"],
            "http_body_timeout",
            json!(0.5),
        ),
        (
            "http_max_body_bytes",
            "frontend",
            vec!["--http-max-body-bytes", "1024"],
            "http_max_body_bytes",
            json!(1024),
        ),
        (
            "http_max_connections",
            "frontend",
            vec!["--http-max-connections", "100"],
            "http_max_connections",
            json!(100),
        ),
        (
            "graceful_shutdown_timeout",
            "frontend",
            vec!["--graceful-shutdown-timeout", "2"],
            "graceful_shutdown_timeout",
            json!(2.0),
        ),
        (
            "request_timeout",
            "frontend",
            vec!["--request-timeout", "2m"],
            "request_timeout",
            json!(120.0),
        ),
        (
            "ttft_timeout",
            "frontend",
            vec!["--ttft-timeout", "45s"],
            "ttft_timeout",
            json!(45.0),
        ),
        (
            "model_name",
            "frontend",
            vec!["--model-name", "llama"],
            "model_name",
            json!("llama"),
        ),
        (
            "model_path",
            "frontend",
            vec!["--model-path", "."],
            "model_path",
            json!("."),
        ),
        (
            "router_mode",
            "frontend",
            vec!["--router-mode", "kv"],
            "router_mode",
            json!("kv"),
        ),
        (
            "kv_cache_block_size",
            "frontend",
            vec!["--kv-cache-block-size", "32"],
            "block_size",
            json!(32),
        ),
        (
            "prefill_router_endpoint",
            "frontend",
            vec!["--prefill-router-endpoint", "prefill.router.generate"],
            "prefill_router_endpoint",
            json!("prefill.router.generate"),
        ),
        (
            "mock_response_text",
            "mocker",
            vec!["--mock-response-text", "hello"],
            "mock_response_text",
            json!("hello"),
        ),
        (
            "dyn_reasoning_parser",
            "frontend",
            vec!["--dyn-reasoning-parser", "qwen3"],
            "dyn_reasoning_parser",
            json!("qwen3"),
        ),
        (
            "context_length",
            "frontend",
            vec!["--context-length", "131072"],
            "context_length",
            json!(131072),
        ),
        (
            "context_length",
            "mocker",
            vec!["--context-length", "4096"],
            "context_length",
            json!(4096),
        ),
        (
            "graceful_shutdown_timeout",
            "router",
            vec!["--graceful-shutdown-timeout", "4"],
            "graceful_shutdown_timeout",
            json!(4.0),
        ),
        (
            "graceful_shutdown_timeout",
            "mocker",
            vec!["--graceful-shutdown-timeout", "3"],
            "graceful_shutdown_timeout",
            json!(3.0),
        ),
        (
            "disaggregation_mode",
            "mocker",
            vec!["--disaggregation-mode", "prefill"],
            "disaggregation_mode",
            json!("prefill"),
        ),
        (
            "engine_url",
            "engine",
            vec!["--url", "http://127.0.0.1:8000"],
            "engine_url",
            json!("http://127.0.0.1:8000"),
        ),
        (
            "engine_kv_events",
            "engine",
            vec!["--kv-events", "tcp://127.0.0.1:5557"],
            "engine_kv_events",
            json!("tcp://127.0.0.1:5557"),
        ),
        (
            "engine_replay",
            "engine",
            vec![
                "--kv-events",
                "tcp://127.0.0.1:5557",
                "--replay",
                "tcp://127.0.0.1:5600",
            ],
            "engine_replay",
            json!("tcp://127.0.0.1:5600"),
        ),
        (
            "engine_dp_size",
            "engine",
            vec!["--dp-size", "2"],
            "engine_dp_size",
            json!(2),
        ),
        (
            "engine_block_size",
            "engine",
            vec!["--block-size", "32"],
            "engine_block_size",
            json!(32),
        ),
        (
            "engines",
            "frontend",
            vec![
                "--engine",
                "http://127.0.0.1:8101,kv-events=tcp://127.0.0.1:5557",
            ],
            "engines",
            json!(["http://127.0.0.1:8101,kv-events=tcp://127.0.0.1:5557"]),
        ),
        // Stand-in flags that apply only with another: that one comes first
        // (the environment test sets it on the command line as context).
        (
            "openai_port",
            "mocker",
            vec!["--openai-port", "8101"],
            "openai_port",
            json!(8101),
        ),
        (
            "openai_host",
            "mocker",
            vec!["--openai-port", "8101", "--openai-host", "127.0.0.1"],
            "openai_host",
            json!("127.0.0.1"),
        ),
        (
            "zmq_kv_events_port",
            "mocker",
            vec!["--zmq-kv-events-port", "5557"],
            "zmq_kv_events_port",
            json!(5557),
        ),
        (
            "zmq_replay_port",
            "mocker",
            vec!["--zmq-kv-events-port", "5557", "--zmq-replay-port", "5600"],
            "zmq_replay_port",
            json!(5600),
        ),
        (
            "zmq_event_format",
            "mocker",
            vec![
                "--zmq-kv-events-port",
                "5557",
                "--zmq-event-format",
                "array",
            ],
            "zmq_event_format",
            json!("array"),
        ),
        (
            "router_endpoint",
            "frontend",
            vec!["--router-endpoint", "pool.router.generate"],
            "router_endpoint",
            json!("pool.router.generate"),
        ),
        (
            "migration_limit",
            "frontend",
            vec!["--migration-limit", "3"],
            "migration_limit",
            json!(3),
        ),
        (
            "enforce_disagg",
            "frontend",
            vec!["--enforce-disagg"],
            "enforce_disagg",
            json!(true),
        ),
        (
            "overlap_score_weight",
            "frontend",
            vec!["--kv-overlap-score-weight", "2.5"],
            "overlap_score_weight",
            json!(2.5),
        ),
        (
            "router_temperature",
            "frontend",
            vec!["--router-temperature", "0.5"],
            "router_temperature",
            json!(0.5),
        ),
        (
            "kv_events",
            "frontend",
            vec!["--no-kv-events", "--kv-events"],
            "use_kv_events",
            json!(true),
        ),
        (
            "no_kv_events",
            "frontend",
            vec!["--no-kv-events"],
            "use_kv_events",
            json!(false),
        ),
        (
            "durable_kv_events",
            "frontend",
            vec!["--durable-kv-events"],
            "durable_kv_events",
            json!(true),
        ),
        (
            "router_replica_sync",
            "frontend",
            vec!["--router-replica-sync"],
            "router_replica_sync",
            json!(true),
        ),
        (
            "router_snapshot_threshold",
            "frontend",
            vec!["--router-snapshot-threshold", "50"],
            "router_snapshot_threshold",
            json!(50),
        ),
        (
            "router_reset_states",
            "frontend",
            vec!["--router-reset-states"],
            "router_reset_states",
            json!(true),
        ),
        (
            "track_active_blocks",
            "frontend",
            vec!["--no-track-active-blocks", "--track-active-blocks"],
            "router_track_active_blocks",
            json!(true),
        ),
        (
            "no_track_active_blocks",
            "frontend",
            vec!["--no-track-active-blocks"],
            "router_track_active_blocks",
            json!(false),
        ),
        (
            "router_track_output_blocks",
            "frontend",
            vec!["--track-output-blocks"],
            "router_track_output_blocks",
            json!(true),
        ),
        (
            "assume_kv_reuse",
            "frontend",
            vec!["--no-assume-kv-reuse", "--assume-kv-reuse"],
            "router_assume_kv_reuse",
            json!(true),
        ),
        (
            "no_assume_kv_reuse",
            "frontend",
            vec!["--no-assume-kv-reuse"],
            "router_assume_kv_reuse",
            json!(false),
        ),
        (
            "router_ttl_secs",
            "frontend",
            vec!["--router-ttl", "90s"],
            "router_ttl_secs",
            json!(90.0),
        ),
        (
            "router_max_tree_size",
            "frontend",
            vec!["--router-max-tree-size", "1000"],
            "router_max_tree_size",
            json!(1000),
        ),
        (
            "router_prune_target_ratio",
            "frontend",
            vec!["--router-prune-target-ratio", "0.5"],
            "router_prune_target_ratio",
            json!(0.5),
        ),
        (
            "router_event_threads",
            "frontend",
            vec!["--router-event-threads", "4"],
            "router_event_threads",
            json!(4),
        ),
        (
            "router_sticky_stake",
            "frontend",
            vec!["--router-mode", "kv-sticky", "--router-sticky-stake", "0.7"],
            "router_sticky_stake",
            json!(0.7),
        ),
        (
            "router_sticky_spill",
            "frontend",
            vec!["--router-mode", "kv-sticky", "--router-sticky-spill", "0.5"],
            "router_sticky_spill",
            json!(0.5),
        ),
        (
            "router_queue_threshold",
            "frontend",
            vec!["--router-mode", "kv", "--router-queue-threshold", "2"],
            "router_queue_threshold",
            json!(2.0),
        ),
        (
            "router_queue_policy",
            "frontend",
            vec![
                "--router-mode",
                "kv",
                "--router-queue-threshold",
                "2",
                "--router-queue-policy",
                "wspt",
            ],
            "router_queue_policy",
            json!("wspt"),
        ),
        (
            "active_decode_blocks_threshold",
            "frontend",
            vec!["--active-decode-blocks-threshold", "0.9"],
            "active_decode_blocks_threshold",
            json!(0.9),
        ),
        (
            "active_prefill_tokens_threshold",
            "frontend",
            vec!["--active-prefill-tokens-threshold", "5000"],
            "active_prefill_tokens_threshold",
            json!(5000),
        ),
        (
            "active_prefill_tokens_threshold_frac",
            "frontend",
            vec!["--active-prefill-tokens-threshold-frac", "1.5"],
            "active_prefill_tokens_threshold_frac",
            json!(1.5),
        ),
        (
            "namespace",
            "frontend",
            vec!["--namespace", "prod"],
            "namespace",
            json!("prod"),
        ),
        (
            "store_kv",
            "frontend",
            vec!["--store-kv", "file"],
            "store_kv",
            json!("file"),
        ),
        (
            "request_plane",
            "frontend",
            vec!["--request-plane", "nats"],
            "request_plane",
            json!("nats"),
        ),
        (
            "event_plane",
            "frontend",
            vec!["--event-plane", "zmq"],
            "event_plane",
            json!("zmq"),
        ),
        (
            "connector",
            "frontend",
            vec!["--connector", "none"],
            "connector",
            json!(["none"]),
        ),
        (
            "custom_jinja_template",
            "frontend",
            vec!["--custom-jinja-template", "Cargo.toml"],
            "custom_jinja_template",
            json!("Cargo.toml"),
        ),
        (
            "endpoint_types",
            "frontend",
            vec!["--endpoint-types", "chat"],
            "endpoint_types",
            json!(["chat"]),
        ),
        (
            "dump_config_to",
            "frontend",
            vec!["--dump-config-to", "out.json"],
            "dump_config_to",
            json!("out.json"),
        ),
        (
            "endpoint",
            "router",
            vec!["--endpoint", "dyn://ns.prefill.generate"],
            "endpoint",
            json!("dyn://ns.prefill.generate"),
        ),
        (
            "router_block_size",
            "router",
            vec!["--block-size", "64"],
            "block_size",
            json!(64),
        ),
        (
            "config",
            "global-router",
            vec!["--config", "../../examples/global-router-pools.json"],
            "config",
            json!("../../examples/global-router-pools.json"),
        ),
        (
            "component_name",
            "global-router",
            vec!["--component-name", "gr"],
            "component_name",
            json!("gr"),
        ),
        (
            "default_ttft_target",
            "global-router",
            vec!["--default-ttft-target", "100"],
            "default_ttft_target",
            json!(100.0),
        ),
        (
            "default_itl_target",
            "global-router",
            vec!["--default-itl-target", "50"],
            "default_itl_target",
            json!(50.0),
        ),
        (
            "num_gpu_blocks",
            "mocker",
            vec!["--num-gpu-blocks", "1024"],
            "num_gpu_blocks",
            json!(1024),
        ),
        (
            "block_size",
            "mocker",
            vec!["--block-size", "16"],
            "block_size",
            json!(16),
        ),
        (
            "max_num_seqs",
            "mocker",
            vec!["--max-num-seqs", "8"],
            "max_num_seqs",
            json!(8),
        ),
        (
            "max_num_batched_tokens",
            "mocker",
            vec!["--max-num-batched-tokens", "2048"],
            "max_num_batched_tokens",
            json!(2048),
        ),
        (
            "enable_prefix_caching",
            "mocker",
            vec!["--no-enable-prefix-caching", "--enable-prefix-caching"],
            "enable_prefix_caching",
            json!(true),
        ),
        (
            "no_enable_prefix_caching",
            "mocker",
            vec!["--no-enable-prefix-caching"],
            "enable_prefix_caching",
            json!(false),
        ),
        (
            "enable_chunked_prefill",
            "mocker",
            vec!["--no-enable-chunked-prefill", "--enable-chunked-prefill"],
            "enable_chunked_prefill",
            json!(true),
        ),
        (
            "no_enable_chunked_prefill",
            "mocker",
            vec!["--no-enable-chunked-prefill"],
            "enable_chunked_prefill",
            json!(false),
        ),
        (
            "watermark",
            "mocker",
            vec!["--watermark", "0.05"],
            "watermark",
            json!(0.05),
        ),
        (
            "speedup_ratio",
            "mocker",
            vec!["--speedup-ratio", "10"],
            "speedup_ratio",
            json!(10.0),
        ),
        (
            "data_parallel_size",
            "mocker",
            vec!["--data-parallel-size", "2"],
            "data_parallel_size",
            json!(2),
        ),
        (
            "num_workers",
            "mocker",
            vec!["--num-workers", "3"],
            "num_workers",
            json!(3),
        ),
        (
            "workers",
            "serve",
            vec!["--workers", "8"],
            "workers",
            json!(8),
        ),
        (
            "trace",
            "sim",
            vec!["--trace", "src/main.rs"],
            "trace",
            json!("src/main.rs"),
        ),
        (
            "sim_workers",
            "sim",
            vec!["--workers", "3"],
            "workers",
            json!(3),
        ),
        (
            "sim_router_mode",
            "sim",
            vec!["--router-mode", "kv,oracle"],
            "router_mode",
            json!(["kv", "oracle"]),
        ),
        (
            "speedup",
            "sim",
            vec!["--speedup", "2.5"],
            "speedup",
            json!(2.5),
        ),
        ("limit", "sim", vec!["--limit", "100"], "limit", json!(100)),
        (
            "json",
            "sim",
            vec!["--json", "o.json"],
            "json",
            json!("o.json"),
        ),
        (
            "plot",
            "sim",
            vec!["--plot", "o.svg"],
            "plot",
            json!("o.svg"),
        ),
        ("seed", "sim", vec!["--seed", "9"], "seed", json!(9)),
        (
            "shape",
            "synth-trace",
            vec!["--shape", "large-families"],
            "shape",
            json!("large-families"),
        ),
        (
            "requests",
            "synth-trace",
            vec!["--requests", "50"],
            "requests",
            json!(50),
        ),
        (
            "rate",
            "synth-trace",
            vec!["--rate", "2.5"],
            "rate",
            json!(2.5),
        ),
        (
            "synth_seed",
            "synth-trace",
            vec!["--seed", "4"],
            "synth_seed",
            json!(4),
        ),
        (
            "out",
            "synth-trace",
            vec!["--out", "x.jsonl"],
            "out",
            json!("x.jsonl"),
        ),
        (
            "no_progress",
            "sim",
            vec!["--no-progress"],
            "no_progress",
            json!(true),
        ),
    ]
}

#[test]
fn every_flag_sets_its_value_and_is_sourced_from_the_cli() {
    let none = env(&[]);
    for (id, sub, tokens, key, want) in flag_rows() {
        let (parsed, dump) = run(sub, &tokens, &none);
        assert_eq!(value(&dump, key), want, "{sub} {tokens:?}");
        assert_eq!(
            dump["sources"][key],
            json!("cli"),
            "{sub} {tokens:?} source of {key} ({id})"
        );
        assert_eq!(parsed.sources.get(id), Some(&Source::Cli), "{id}");
    }
}

#[test]
fn every_flag_of_every_subcommand_has_a_row() {
    let rows: HashSet<(&str, &str)> = flag_rows().iter().map(|r| (r.1, r.0)).collect();
    let ids: HashSet<&str> = rows.iter().map(|r| r.1).collect();
    let cmd = command();
    // `bench` and `call` are tools, not services: their arguments are positional
    // or benchmark-specific and have no environment variables (the binary tests
    // run them end to end).
    for sub in cmd
        .get_subcommands()
        .filter(|s| !matches!(s.get_name(), "bench" | "call"))
    {
        for arg in sub.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" || REFUSED.contains(&id) {
                continue;
            }
            assert!(
                ids.contains(id),
                "flag {id} of {} has no test row",
                sub.get_name()
            );
        }
    }
}

#[test]
fn every_environment_variable_is_read() {
    let rows = flag_rows();
    let mut tested = 0;
    for var in ENV.iter().filter(|v| !REFUSED.contains(&v.arg)) {
        for name in var.names {
            // Take the flag row's value; switches are tested in their non-default direction.
            let mut context: &[&str] = &[];
            let (sub, env_value, key, want) = match var.kind {
                EnvKind::Value => {
                    let row = rows
                        .iter()
                        .find(|r| r.0 == var.arg)
                        .expect("row per env arg");
                    let v = row.2.last().expect("a value token").to_string();
                    // Flags before the one under test are context it needs.
                    context = &row.2[..row.2.len() - 2];
                    (row.1, v, row.3, row.4.clone())
                }
                EnvKind::Bool {
                    negative: Some(neg),
                } => {
                    let row = rows
                        .iter()
                        .find(|r| r.0 == neg)
                        .expect("row per negative switch");
                    (row.1, "false".to_string(), row.3, row.4.clone())
                }
                EnvKind::Bool { negative: None } => {
                    let row = rows
                        .iter()
                        .find(|r| r.0 == var.arg)
                        .expect("row per switch");
                    (row.1, "true".to_string(), row.3, row.4.clone())
                }
            };
            let (_, dump) = run_without(sub, context, &env(&[(name, &env_value)]), var.arg);
            assert_eq!(value(&dump, key), want, "{name}={env_value}");
            assert_eq!(dump["sources"][key], json!(format!("env:{name}")), "{name}");
            tested += 1;
        }
    }
    assert!(tested >= 60, "{tested}");
}

#[test]
fn precedence_cli_over_env_over_default() {
    let e = env(&[
        ("DYN_ROUTER_TEMPERATURE", "0.7"),
        ("DYN_KV_EVENTS", "false"),
    ]);
    let (_, d) = run(
        "frontend",
        &["--router-temperature", "0.2", "--kv-events"],
        &e,
    );
    assert_eq!(value(&d, "router_temperature"), json!(0.2));
    assert_eq!(value(&d, "use_kv_events"), json!(true));
    assert_eq!(d["sources"]["router_temperature"], json!("cli"));
    let (_, d) = run("frontend", &[], &e);
    assert_eq!(value(&d, "router_temperature"), json!(0.7));
    assert_eq!(value(&d, "use_kv_events"), json!(false));
    let (_, d) = run("frontend", &[], &env(&[]));
    assert_eq!(value(&d, "router_temperature"), json!(0.0));
    assert_eq!(d["sources"]["router_temperature"], json!("default"));
    // The first alias set wins over later ones.
    let e = env(&[
        ("DYN_OVERLAP_SCORE_WEIGHT", "3"),
        ("DYN_KV_OVERLAP_SCORE_WEIGHT", "2"),
    ]);
    assert_eq!(
        value(&run("frontend", &[], &e).1, "overlap_score_weight"),
        json!(2.0)
    );
}

#[test]
fn defaults_match_the_seed_documents() {
    let none = env(&[]);
    let (_, d) = run("frontend", &[], &none);
    assert_eq!(
        d["kv_router_config"],
        json!(kvrouter_core::KvRouterConfig::default())
    );
    for (key, want) in [
        ("router_mode", json!("round-robin")),
        ("http_port", json!(8000)),
        ("namespace", json!("dynamo")),
        ("request_plane", json!("tcp")),
        ("event_plane", json!("nats")),
        ("store_kv", json!("etcd")),
        ("block_size", Value::Null),
    ] {
        assert_eq!(value(&d, key), want, "{key}");
    }
    assert_eq!(
        value(&run("router", &[], &none).1, "block_size"),
        json!(128)
    );
    let (_, m) = run("mocker", &[], &none);
    for (key, want) in [
        ("num_gpu_blocks", json!(16384)),
        ("block_size", json!(64)),
        ("max_num_seqs", json!(256)),
        ("max_num_batched_tokens", json!(8192)),
        ("enable_prefix_caching", json!(true)),
        ("enable_chunked_prefill", json!(true)),
        ("watermark", json!(0.01)),
        ("speedup_ratio", json!(1.0)),
        ("model_name", json!("mock-model")),
        ("endpoint", json!("dynamo.backend.generate")),
    ] {
        assert_eq!(value(&m, key), want, "{key}");
    }
    assert_eq!(value(&run("serve", &[], &none).1, "store_kv"), json!("mem"));
    assert_eq!(
        value(&run("global-router", &[], &none).1, "component_name"),
        json!("global_router")
    );
}

/// Reference flags parsed only to be refused with a reason (any value).
const REFUSED: &[&str] = &["dyn_tool_call_parser"];

#[test]
fn unimplemented_reference_flags_are_refused_by_flag_and_env() {
    for (tail, var, flag) in [
        (
            &["--dyn-tool-call-parser", "hermes"][..],
            ("DYN_TOOL_CALL_PARSER", "hermes"),
            "--dyn-tool-call-parser",
        ),
        (
            &["--connector", "none,nixl"][..],
            ("DYN_CONNECTOR", "lmcache"),
            "--connector",
        ),
    ] {
        let by_flag = problems("frontend", tail);
        assert!(
            by_flag
                .iter()
                .any(|p| p.contains(flag) && p.contains("not implemented")),
            "{tail:?}: {by_flag:?}"
        );
        let parsed = parse(vec!["kvrouter", "frontend"], &env(&[var])).unwrap();
        let by_env: Vec<String> = parsed
            .resolve()
            .expect_err("refused")
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert!(
            by_env.iter().any(|p| p.contains(flag)),
            "{var:?}: {by_env:?}"
        );
    }
    // `serve` shares the runtime flags and refuses them too.
    assert!(
        problems("serve", &["--connector", "kvbm"])
            .iter()
            .any(|p| p.contains("--connector"))
    );
}

fn problems(sub: &str, tail: &[&str]) -> Vec<String> {
    let mut argv = vec!["kvrouter", sub];
    argv.extend(base(sub));
    argv.extend(tail);
    let parsed = parse(argv, &env(&[])).unwrap_or_else(|e| panic!("{}", e.message));
    parsed
        .resolve()
        .expect_err("invalid")
        .iter()
        .map(|p| p.to_string())
        .collect()
}

#[test]
fn every_validation_rule_names_its_flags() {
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "frontend",
            &["--durable-kv-events", "--no-kv-events"],
            "--durable-kv-events + --kv-events/--no-kv-events",
        ),
        (
            "frontend",
            &["--router-event-threads", "2", "--no-kv-events"],
            "--router-event-threads + --kv-events/--no-kv-events",
        ),
        (
            "frontend",
            &["--track-output-blocks", "--no-track-active-blocks"],
            "--track-output-blocks + --track-active-blocks",
        ),
        (
            "frontend",
            &["--kv-overlap-score-weight", "-1"],
            "--kv-overlap-score-weight:",
        ),
        (
            "frontend",
            &["--router-temperature", "-0.1"],
            "--router-temperature:",
        ),
        (
            "frontend",
            &["--router-prune-target-ratio", "1.1"],
            "--router-prune-target-ratio:",
        ),
        (
            "frontend",
            &["--router-max-tree-size", "0"],
            "--router-max-tree-size:",
        ),
        (
            "frontend",
            &["--router-event-threads", "0"],
            "--router-event-threads:",
        ),
        (
            "frontend",
            &["--router-snapshot-threshold", "0"],
            "--router-snapshot-threshold:",
        ),
        (
            "frontend",
            &["--router-queue-threshold", "-1"],
            "--router-queue-threshold:",
        ),
        ("frontend", &["--router-ttl", "-5"], ""),
        (
            "frontend",
            &["--active-decode-blocks-threshold", "1.2"],
            "--active-decode-blocks-threshold:",
        ),
        (
            "frontend",
            &["--active-prefill-tokens-threshold-frac", "-2"],
            "--active-prefill-tokens-threshold-frac:",
        ),
        (
            "frontend",
            &["--kv-cache-block-size", "1"],
            "--kv-cache-block-size:",
        ),
        (
            "frontend",
            &["--model-path", "no/such/dir"],
            "--model-path:",
        ),
        (
            "frontend",
            &["--custom-jinja-template", "no/such.jinja"],
            "--custom-jinja-template:",
        ),
        ("frontend", &["--namespace", "a.b"], "--namespace:"),
        ("router", &["--endpoint", "just-one-part"], "--endpoint:"),
        ("router", &["--block-size", "1"], "--block-size:"),
        ("global-router", &["--config", "missing.json"], "--config:"),
        (
            "global-router",
            &["--default-ttft-target", "0"],
            "--default-ttft-target:",
        ),
        (
            "global-router",
            &["--default-itl-target", "-3"],
            "--default-itl-target:",
        ),
        ("mocker", &["--watermark", "1"], "--watermark:"),
        ("mocker", &["--speedup-ratio", "0"], "--speedup-ratio:"),
        ("mocker", &["--num-gpu-blocks", "0"], "--num-gpu-blocks:"),
        ("mocker", &["--block-size", "1"], "--block-size:"),
        ("mocker", &["--endpoint", "a.b"], "--endpoint:"),
        ("mocker", &["--num-workers", "0"], "--num-workers:"),
        (
            "serve",
            &["--kv-cache-block-size", "32", "--block-size", "64"],
            "--kv-cache-block-size + --block-size",
        ),
        ("serve", &["--store-kv", "etcd"], "--store-kv:"),
        ("serve", &["--workers", "0"], "--workers:"),
        ("sim", &["--trace", "missing.jsonl"], "--trace:"),
        ("sim", &["--speedup", "0"], "--speedup:"),
        ("sim", &["--workers", "0"], "--workers:"),
        ("sim", &["--limit", "0"], "--limit:"),
        ("sim", &["--router-mode", "fastest"], ""),
        // The router queue where it could do nothing.
        (
            "frontend",
            &["--router-queue-threshold", "1"],
            "--router-queue-threshold + --router-mode: the queue waits",
        ),
        (
            "serve",
            &["--router-queue-policy", "wspt"],
            "--router-queue-policy: orders the router queue, which is off",
        ),
        (
            "frontend",
            &[
                "--router-mode",
                "kv",
                "--router-queue-threshold",
                "1",
                "--router-endpoint",
                "ns.router.generate",
            ],
            "--router-queue-threshold + --router-endpoint",
        ),
        (
            "serve",
            &[
                "--router-queue-threshold",
                "1",
                "--engine",
                "http://127.0.0.1:9",
            ],
            "--router-queue-threshold + --engine",
        ),
        ("frontend", &["--router-queue-policy", "lifo"], ""),
        (
            "frontend",
            &["--router-mode", "kv", "--router-sticky-spill", "0.5"],
            "--router-sticky-spill: it tunes --router-mode kv-sticky",
        ),
        (
            "router",
            &["--router-sticky-spill", "0.5"],
            "--router-sticky-spill: the standalone router",
        ),
        (
            "frontend",
            &["--router-mode", "kv-sticky", "--router-sticky-spill", "-1"],
            "--router-sticky-spill:",
        ),
    ];
    for (sub, tail, needle) in cases {
        if needle.is_empty() {
            // Rejected by the flag's own parser (clap), exit code 2 too.
            let mut argv = vec!["kvrouter", sub];
            argv.extend(*tail);
            let err = parse(argv, &env(&[])).expect_err("rejected");
            assert_eq!(err.code, 2);
            continue;
        }
        let got = problems(sub, tail);
        assert!(
            got.iter().any(|p| p.contains(needle)),
            "{sub} {tail:?}: {got:?}"
        );
    }
    // All problems at once.
    let all = problems(
        "frontend",
        &[
            "--router-temperature",
            "-1",
            "--no-kv-events",
            "--durable-kv-events",
            "--router-max-tree-size",
            "0",
        ],
    );
    assert_eq!(all.len(), 3, "{all:?}");
}

#[test]
fn bad_values_are_rejected_with_exit_code_2() {
    for (argv, env_pairs) in [
        (
            vec!["kvrouter", "frontend", "--router-mode", "fastest"],
            vec![],
        ),
        (vec!["kvrouter", "frontend", "--store-kv", "redis"], vec![]),
        (vec!["kvrouter", "frontend", "--http-port", "99999"], vec![]),
        (vec!["kvrouter", "frontend", "--no-such-flag"], vec![]),
        (vec!["kvrouter", "router"], vec![]),
        (
            vec!["kvrouter", "frontend"],
            vec![("DYN_ROUTER_MODE", "fastest")],
        ),
        (
            vec!["kvrouter", "frontend"],
            vec![("DYN_KV_EVENTS", "perhaps")],
        ),
    ] {
        let err = parse(argv.clone(), &env(&env_pairs)).expect_err("rejected");
        assert_eq!(err.code, 2, "{argv:?} {env_pairs:?}");
        assert!(!err.to_stdout);
    }
    let e = parse(
        ["kvrouter", "frontend"],
        &env(&[("DYN_ROUTER_MODE", "fastest")]),
    )
    .unwrap_err();
    assert!(e.message.contains("DYN_ROUTER_MODE"), "{}", e.message);
    let help = parse(["kvrouter", "frontend", "--help"], &env(&[])).unwrap_err();
    assert_eq!(help.code, 0);
    assert!(
        help.message.contains("[env: DYN_ROUTER_MODE]"),
        "help lists env vars"
    );
}

#[test]
fn router_endpoint_and_required_flags_come_from_env_too() {
    let e = env(&[("DYN_ENDPOINT", "ns.worker.generate")]);
    let parsed = parse(["kvrouter", "router"], &e).expect("endpoint from env");
    let r = parsed.resolve().unwrap();
    assert_eq!(r.settings["endpoint"], json!("ns.worker.generate"));
}

#[test]
fn global_router_config_violations_are_all_reported() {
    let dir = std::env::temp_dir().join(format!("kvr-pools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.json");
    let mut cfg: Value = serde_json::from_str(include_str!(
        "../../../../examples/global-router-pools.json"
    ))
    .unwrap();
    cfg["num_decode_pools"] = json!(3);
    cfg["prefill_pool_selection_strategy"]["prefill_pool_mapping"] = json!([[0, 4]]);
    std::fs::write(&bad, cfg.to_string()).unwrap();
    let parsed = parse(
        vec![
            "kvrouter",
            "global-router",
            "--model-name",
            "m",
            "--config",
            bad.to_str().unwrap(),
        ],
        &env(&[]),
    )
    .unwrap();
    let problems = parsed.resolve().unwrap_err();
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    let text = text.join("\n");
    assert!(
        text.contains("num_decode_pools is 3 but decode_pool_dynamo_namespaces has 2"),
        "{text}"
    );
    assert!(text.contains("has 1 rows, the resolution says 4"), "{text}");
    assert!(
        text.contains("mapping[0][1] = 4 is not a pool (0..1)"),
        "{text}"
    );
    assert!(
        problems
            .iter()
            .all(|p| p.flags == vec!["--config".to_string()])
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn settings_only_the_environment_gives_come_from_the_injected_environment() {
    use kvrouter_runtime::connect::{EventPlaneKind, StoreConfig};
    let e = env(&[
        (
            "ETCD_ENDPOINTS",
            "http://10.0.0.1:2379, http://10.0.0.2:2379",
        ),
        ("NATS_SERVER", "nats://10.0.0.3:4222"),
        ("DYN_TCP_ADVERTISE_HOST", "10.0.0.9"),
        ("DYN_SYSTEM_PORT", "9090"),
    ]);
    let parsed = parse(
        vec!["kvrouter", "router", "--endpoint", "ns.backend.generate"],
        &e,
    )
    .unwrap();
    let r = parsed.command.runtime().unwrap();
    assert_eq!(r.env.system_port.as_deref(), Some("9090"));
    let cfg = r.node_config("0.0.0.0").unwrap();
    assert_eq!(
        cfg.store,
        StoreConfig::Etcd(vec![
            "http://10.0.0.1:2379".into(),
            "http://10.0.0.2:2379".into()
        ])
    );
    assert_eq!(cfg.nats_url, "nats://10.0.0.3:4222");
    assert_eq!(cfg.advertise_host.as_deref(), Some("10.0.0.9"));
    assert_eq!(cfg.events, EventPlaneKind::Nats);
    // Nothing set: the reference defaults.
    let parsed = parse(vec!["kvrouter", "mocker", "--store-kv", "file"], &env(&[])).unwrap();
    let cfg = parsed
        .command
        .runtime()
        .unwrap()
        .node_config("0.0.0.0")
        .unwrap();
    assert_eq!(cfg.nats_url, "nats://localhost:4222");
    assert!(matches!(cfg.store, StoreConfig::File(..)));
    assert_eq!(cfg.advertise_host, None);
}

#[test]
fn every_service_subcommand_resolves_to_its_typed_plan() {
    use super::plan::Plan;
    for sub in [
        "serve",
        "frontend",
        "router",
        "sim",
        "mocker",
        "engine",
        "global-router",
        "synth-trace",
    ] {
        let mut argv = vec!["kvrouter", sub];
        argv.extend(base(sub));
        let parsed = parse(argv, &env(&[])).unwrap();
        let resolved = parsed.resolve().unwrap_or_else(|p| panic!("{sub}: {p:?}"));
        let plan = resolved.plan;
        let matches = matches!(
            (sub, &plan),
            ("serve", Plan::Serve(..))
                | ("frontend", Plan::Frontend(..))
                | ("router", Plan::Router(..))
                | ("sim", Plan::Sim(..))
                | ("mocker", Plan::Mocker(..))
                | ("engine", Plan::Engine(..))
                | ("global-router", Plan::GlobalRouter(..))
                | ("synth-trace", Plan::SynthTrace(..))
        );
        assert!(matches, "{sub} planned as {plan:?}");
    }
}

#[test]
fn the_reasoning_parser_is_refused_where_no_answer_is_rendered() {
    for (argv, flag) in [
        (
            vec!["kvrouter", "mocker", "--dyn-reasoning-parser", "basic"],
            "--dyn-reasoning-parser",
        ),
        (
            vec![
                "kvrouter",
                "frontend",
                "--dyn-reasoning-parser",
                "basic",
                "--engine",
                "http://127.0.0.1:8101",
            ],
            "--engine",
        ),
    ] {
        let parsed = parse(argv.clone(), &env(&[])).unwrap();
        let problems: Vec<String> = parsed
            .resolve()
            .expect_err("refused")
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert!(
            problems.iter().any(|p| p.contains(flag)),
            "{argv:?}: {problems:?}"
        );
    }
}
