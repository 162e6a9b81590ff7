//! The binary's exit codes and `--dump-config-to`, run as a user would (a child
//! process with its own environment; the test process's is never changed).

use std::process::Command;

fn kvrouter() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvrouter"));
    // Start from a clean slate so the machine's own DYN_* cannot leak in.
    for (k, _) in std::env::vars() {
        if k.starts_with("DYN_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn invalid_combination_exits_2_and_names_every_flag() {
    let out = kvrouter()
        .args([
            "frontend",
            "--durable-kv-events",
            "--no-kv-events",
            "--router-temperature",
            "-1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--durable-kv-events"), "{err}");
    assert!(err.contains("--router-temperature"), "{err}");
}

#[test]
fn unknown_value_from_env_exits_2() {
    let out = kvrouter()
        .args(["frontend"])
        .env("DYN_ROUTER_MODE", "nearest")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DYN_ROUTER_MODE"));
}

#[test]
fn valid_service_config_is_dumped_and_checked_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resolved.json");
    let out = kvrouter()
        .args([
            "router",
            "--block-size",
            "32",
            "--check-config",
            "--dump-config-to",
        ])
        .arg(&path)
        .env("DYN_ENDPOINT", "ns.prefill.generate")
        .env("DYN_ROUTER_TEMPERATURE", "0.25")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("the configuration is valid"));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(doc["kv_router_config"]["router_temperature"], 0.25);
    assert_eq!(doc["settings"]["block_size"], 32);
    assert_eq!(doc["settings"]["endpoint"], "ns.prefill.generate");
    assert_eq!(
        doc["sources"]["router_temperature"],
        "env:DYN_ROUTER_TEMPERATURE"
    );
    assert_eq!(doc["sources"]["block_size"], "cli");
    assert_eq!(doc["sources"]["router_max_tree_size"], "default");
}

#[test]
fn help_exits_0_and_lists_env_vars() {
    let out = kvrouter().args(["serve", "--help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--kv-overlap-score-weight",
        "DYN_KV_OVERLAP_SCORE_WEIGHT",
        "--num-gpu-blocks",
        "--workers",
    ] {
        assert!(help.contains(needle), "{needle}");
    }
}

/// `kvrouter serve` as the README runs it: a child process on a free port,
/// answering a real HTTP client, with no external service, routing by KV
/// cache without being asked to.
#[tokio::test]
async fn serve_answers_openai_requests() {
    use std::io::BufRead;
    let mut child = kvrouter()
        .args([
            "serve",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--workers",
            "2",
            "--speedup-ratio",
            "20",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    })
    .await
    .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let client = reqwest::Client::new();
    let v: serde_json::Value = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "mock-model", "max_tokens": 3, "ignore_eos": true,
            "messages": [{"role": "user", "content": "hello"}],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("dynamo_frontend_model_workers{model=\"mock-model\"} 2"));
    // With no --router-mode, serve routes by KV cache.
    assert!(
        metrics
            .contains("dynamo_component_router_requests_total{router_mode=\"kv\",status=\"ok\"} 1"),
        "{metrics}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `--engine` values and combinations a deployment script can get wrong:
/// each is a usage error (exit 2) naming the flag.
#[test]
fn bad_engine_flags_exit_2_naming_them() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["serve", "--engine", "gpu-1:8000"],
            &["--engine", "http(s)://host:port"],
        ),
        (
            &["serve", "--engine", "http://h:1,dp-size=0"],
            &["--engine", "dp-size"],
        ),
        (
            &["serve", "--engine", "http://h:1,kv-events=h:5557"],
            &["--engine", "tcp://host:port"],
        ),
        (
            &[
                "serve",
                "--engine",
                "http://h:1",
                "--engine",
                "http://h:1,dp-size=2",
            ],
            &["--engine", "more than once"],
        ),
        (
            &["serve", "--engine", "http://h:1", "--workers", "2"],
            &["--workers", "no mock worker"],
        ),
        (
            &["serve", "--engine", "http://h:1", "--block-size", "32"],
            &["--block-size", "no mock worker"],
        ),
        (
            &[
                "frontend",
                "--engine",
                "http://h:1",
                "--router-endpoint",
                "a.router.generate",
            ],
            &["--router-endpoint"],
        ),
        (
            &["mocker", "--openai-host", "127.0.0.1"],
            &["--openai-host", "--openai-port"],
        ),
        (
            &["mocker", "--zmq-replay-port", "5600"],
            &["--zmq-replay-port", "--zmq-kv-events-port"],
        ),
        (
            &["mocker", "--openai-port", "8101", "--num-workers", "2"],
            &["--openai-port", "--num-workers"],
        ),
    ];
    for (args, words) in cases {
        let out = kvrouter().args(*args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for w in *words {
            assert!(err.contains(w), "{args:?}: {w:?} not in {err}");
        }
    }
    // The documented deployment form is valid as it stands.
    let ok = kvrouter()
        .args([
            "serve",
            "--http-port",
            "8000",
            "--router-mode",
            "kv",
            "--model-path",
            ".",
            "--kv-cache-block-size",
            "16",
            "--engine",
            "http://127.0.0.1:8101,kv-events=tcp://127.0.0.1:5557",
            "--engine",
            "http://127.0.0.1:8102,kv-events=tcp://127.0.0.1:5558",
            "--check-config",
        ])
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn synth_trace_feeds_sim_and_every_peer_policy_runs() {
    let dir = std::env::temp_dir().join(format!("kvrouter-synth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("t.jsonl");
    let bad = kvrouter()
        .args(["synth-trace", "--shape", "sessions", "--rate", "0", "--out"])
        .arg(&trace)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--rate"));
    let out = kvrouter()
        .args([
            "synth-trace",
            "--shape",
            "large-families",
            "--requests",
            "300",
            "--rate",
            "4",
            "--seed",
            "3",
            "--out",
        ])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&trace).unwrap().lines().count(),
        300
    );
    let json = dir.join("r.json");
    let out = kvrouter()
        .args(["sim", "--no-progress", "--workers", "4", "--router-mode"])
        .arg("round-robin,sglang-cache-aware,prefix-hash,llm-d,oracle")
        .arg("--trace")
        .arg(&trace)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let hit = |mode: &str| {
        let r = reports
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["mode"] == mode)
            .unwrap_or_else(|| panic!("{mode} missing"));
        assert_eq!(r["requests"], 300, "{mode}");
        assert_eq!(r["kv_event_errors"], 0, "{mode}");
        r["hit_rate"].as_f64().unwrap()
    };
    // 32 long shared prefixes over 4 roomy caches: every prefix-aware policy
    // reuses far more than round-robin, and none beats the pooled bound.
    let (rr, oracle) = (hit("round-robin"), hit("oracle"));
    for mode in ["sglang-cache-aware", "prefix-hash", "llm-d"] {
        let h = hit(mode);
        assert!(
            h > rr && h <= oracle + 1e-9,
            "{mode}: {h} vs rr {rr}, oracle {oracle}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn help_into_a_closed_pipe_exits_cleanly() {
    // As `kvrouter serve --help | head -1` does once head has its line.
    for _ in 0..5 {
        let mut child = kvrouter()
            .args(["serve", "--help"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(out.status.code(), Some(0), "{stderr}");
    }
}
