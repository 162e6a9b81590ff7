//! What the router asks of an engine's HTTP server besides requests: its
//! model (`/v1/models`), its health (`/health`), its load (`/metrics`) and,
//! when the operator did not name them, its KV-event ports (vLLM ≥ 0.31's
//! `/kv_event_sources`, SGLang's `/server_info`).
//!
//! Load names differ by engine and version (`spec/engines.md` §5), so each
//! signal is looked up in order: vLLM's, then SGLang's, then TensorRT-LLM's,
//! with vLLM's older KV-usage name as a fallback. vLLM labels every family
//! with `engine` (the data-parallel index): values are kept per rank.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Client;
use serde_json::Value;

use crate::spec::rank_endpoint;

/// One rank's load as the engine reports it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineLoad {
    /// Requests running.
    pub running: Option<f64>,
    /// Requests waiting.
    pub waiting: Option<f64>,
    /// KV cache in use, 0..1.
    pub kv_usage: Option<f64>,
}

const RUNNING: &[&str] = &[
    "vllm:num_requests_running",
    "sglang:num_running_reqs",
    "trtllm_num_requests_running",
];
const WAITING: &[&str] = &[
    "vllm:num_requests_waiting",
    "sglang:num_queue_reqs",
    "trtllm_num_requests_waiting",
];
const KV_USAGE: &[&str] = &[
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
    "trtllm_kv_cache_utilization",
];

/// One sample line of the Prometheus text format: name, labels, value.
///
/// Written here because `prometheus-parse` rejects the `:` that vLLM's and
/// SGLang's metric names contain; only what routing needs is read.
fn sample(line: &str) -> Option<(&str, &str, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let (labels, rest) = if line[name_end..].starts_with('{') {
        let close = line[name_end..].find('}')? + name_end;
        (&line[name_end + 1..close], &line[close + 1..])
    } else {
        ("", &line[name_end..])
    };
    let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// The value of label `key` in `k="v",…`.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// What an engine's `/metrics` says that routing uses.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scrape {
    /// Load per rank (vLLM's `engine` label; 0 when unlabelled).
    pub ranks: BTreeMap<u32, EngineLoad>,
    /// KV blocks per rank (`vllm:cache_config_info{num_gpu_blocks}`).
    pub num_gpu_blocks: Option<u64>,
    /// Tokens per block (`vllm:cache_config_info{block_size}`, `sglang:page_size`).
    pub block_size: Option<u32>,
}

/// Reads Prometheus text; empty when no known family is present.
pub fn parse_scrape(text: &str) -> Scrape {
    let samples: Vec<(&str, &str, f64)> = text.lines().filter_map(sample).collect();
    let mut out = Scrape::default();
    let mut pick = |names: &[&str], set: fn(&mut EngineLoad, f64)| {
        // The first name the engine exposes wins; the others are older or other engines'.
        let Some(name) = names.iter().find(|n| samples.iter().any(|s| s.0 == **n)) else {
            return;
        };
        for (_, labels, v) in samples.iter().filter(|s| s.0 == *name) {
            let rank = label(labels, "engine")
                .and_then(|e| e.parse().ok())
                .unwrap_or(0);
            set(out.ranks.entry(rank).or_default(), *v);
        }
    };
    pick(RUNNING, |l, v| {
        l.running = Some(l.running.unwrap_or(0.0) + v)
    });
    pick(WAITING, |l, v| {
        l.waiting = Some(l.waiting.unwrap_or(0.0) + v)
    });
    pick(KV_USAGE, |l, v| l.kv_usage = Some(v));
    for (name, labels, v) in &samples {
        match *name {
            "vllm:cache_config_info" => {
                out.num_gpu_blocks = label(labels, "num_gpu_blocks").and_then(|b| b.parse().ok());
                out.block_size = label(labels, "block_size").and_then(|b| b.parse().ok());
            }
            "sglang:page_size" if out.block_size.is_none() => out.block_size = Some(*v as u32),
            _ => {}
        }
    }
    out
}

/// Per-rank load from Prometheus text (see [`parse_scrape`]).
pub fn parse_load(text: &str) -> BTreeMap<u32, EngineLoad> {
    parse_scrape(text).ranks
}

/// KV-event ports an engine advertises, per rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEvents {
    /// The rank.
    pub rank: u32,
    /// Its PUB.
    pub endpoint: String,
    /// Its replay ROUTER.
    pub replay: Option<String>,
    /// Topic prefix.
    pub topic: String,
}

/// Replaces a wildcard or unspecified host (`*`, `0.0.0.0`, `::`) by `host`.
fn routable(endpoint: &str, host: &str) -> String {
    for wild in ["tcp://*:", "tcp://0.0.0.0:", "tcp://[::]:", "tcp://:::"] {
        if let Some(port) = endpoint.strip_prefix(wild) {
            return format!("tcp://{host}:{port}");
        }
    }
    endpoint.to_string()
}

/// vLLM's `/kv_event_sources`: `{dp_rank: {endpoint, replay_endpoint, topic, …}}`.
pub fn parse_kv_event_sources(v: &Value, host: &str) -> Vec<RankEvents> {
    let Some(m) = v.as_object() else {
        return Vec::new();
    };
    let mut out: Vec<RankEvents> = m
        .iter()
        .filter_map(|(rank, cfg)| {
            let enabled = cfg
                .get("enable_kv_cache_events")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            let publisher = cfg.get("publisher").and_then(Value::as_str);
            if !enabled || publisher.is_some_and(|p| p != "zmq") {
                return None;
            }
            Some(RankEvents {
                rank: rank.parse().ok()?,
                endpoint: routable(cfg.get("endpoint")?.as_str()?, host),
                replay: cfg
                    .get("replay_endpoint")
                    .and_then(Value::as_str)
                    .map(|r| routable(r, host)),
                topic: cfg
                    .get("topic")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            })
        })
        .collect();
    out.sort_by_key(|r| r.rank);
    out
}

/// SGLang's `/server_info` `kv_events` block.
pub fn parse_server_info(v: &Value, host: &str) -> Vec<RankEvents> {
    let Some(k) = v.get("kv_events").filter(|k| k.is_object()) else {
        return Vec::new();
    };
    let Some(port) = k.get("endpoint_port_base").and_then(Value::as_u64) else {
        return Vec::new();
    };
    let ep_host = k
        .get("endpoint_host")
        .and_then(Value::as_str)
        .filter(|h| !matches!(*h, "*" | "0.0.0.0" | "::" | ""))
        .unwrap_or(host);
    let base = format!("tcp://{ep_host}:{port}");
    let replay = k
        .get("replay_endpoint_port_base")
        .and_then(Value::as_u64)
        .map(|p| format!("tcp://{ep_host}:{p}"));
    let dp = k.get("dp_size").and_then(Value::as_u64).unwrap_or(1).max(1) as u32;
    let topic = k
        .get("topic")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    (0..dp)
        .map(|r| RankEvents {
            rank: r,
            endpoint: rank_endpoint(&base, r),
            replay: replay.as_deref().map(|p| rank_endpoint(p, r)),
            topic: topic.clone(),
        })
        .collect()
}

/// HTTP probes of one engine.
#[derive(Debug, Clone)]
pub struct Probe {
    client: Client,
    base: String,
    host: String,
    timeout: Duration,
}

impl Probe {
    /// Probes of the server at `base` (`http://host:port`).
    pub fn new(client: Client, base: &str, timeout: Duration) -> Self {
        let host = reqwest::Url::parse(base)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| "127.0.0.1".into());
        Self {
            client,
            base: base.trim_end_matches('/').to_string(),
            host,
            timeout,
        }
    }

    async fn get(&self, path: &str) -> Result<reqwest::Response, String> {
        self.client
            .get(format!("{}{path}", self.base))
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| format!("GET {}{path}: {e}", self.base))
    }

    async fn json(&self, path: &str) -> Result<Value, String> {
        let r = self.get(path).await?;
        if !r.status().is_success() {
            return Err(format!("GET {}{path}: {}", self.base, r.status()));
        }
        r.json()
            .await
            .map_err(|e| format!("GET {}{path}: not JSON: {e}", self.base))
    }

    /// The model ids the engine serves.
    pub async fn models(&self) -> Result<Vec<String>, String> {
        let v = self.json("/v1/models").await?;
        let ids: Vec<String> = v
            .get("data")
            .and_then(Value::as_array)
            .map(|d| {
                d.iter()
                    .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if ids.is_empty() {
            return Err(format!("{}/v1/models lists no model", self.base));
        }
        Ok(ids)
    }

    /// Whether `GET /health` answers 2xx in time.
    pub async fn healthy(&self) -> bool {
        self.get("/health")
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// What `GET /metrics` says (empty if unavailable).
    pub async fn scrape(&self) -> Scrape {
        match self.get("/metrics").await {
            Ok(r) if r.status().is_success() => match r.text().await {
                Ok(t) => parse_scrape(&t),
                Err(_) => Scrape::default(),
            },
            _ => Scrape::default(),
        }
    }

    /// KV-event ports the engine advertises, per rank (empty when none).
    pub async fn event_sources(&self) -> Vec<RankEvents> {
        if let Ok(v) = self.json("/kv_event_sources").await {
            let found = parse_kv_event_sources(&v, &self.host);
            if !found.is_empty() {
                return found;
            }
        }
        if let Ok(v) = self.json("/server_info").await {
            return parse_server_info(&v, &self.host);
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn load_names_by_engine_and_version() {
        let vllm = "# TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3\n\
            vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 1\n\
            # TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 2\n\
            # TYPE vllm:kv_cache_usage_perc gauge\n\
            vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25\n";
        let l = parse_load(vllm);
        assert_eq!(l[&0].running, Some(3.0));
        assert_eq!(l[&1].running, Some(1.0));
        assert_eq!(l[&0].waiting, Some(2.0));
        assert_eq!(l[&0].kv_usage, Some(0.25));
        let old = "vllm:gpu_cache_usage_perc{engine=\"0\"} 0.5\n";
        assert_eq!(parse_load(old)[&0].kv_usage, Some(0.5));
        let sglang = "sglang:num_running_reqs{tp_rank=\"0\"} 4\nsglang:num_queue_reqs 1\nsglang:token_usage 0.1\n";
        let l = parse_load(sglang);
        assert_eq!(
            (l[&0].running, l[&0].waiting, l[&0].kv_usage),
            (Some(4.0), Some(1.0), Some(0.1))
        );
        assert!(parse_load("other_metric 1\n").is_empty());
        let info = "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"2048\"} 1\n";
        let s = parse_scrape(info);
        assert_eq!((s.block_size, s.num_gpu_blocks), (Some(16), Some(2048)));
    }

    #[test]
    fn advertised_ports() {
        let v = json!({"0": {"enable_kv_cache_events": true, "publisher": "zmq",
                              "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5600", "topic": ""},
                       "1": {"enable_kv_cache_events": true, "publisher": "zmq",
                              "endpoint": "tcp://gpu-9:5558", "topic": "kv"}});
        let r = parse_kv_event_sources(&v, "gpu-1");
        assert_eq!(r[0].endpoint, "tcp://gpu-1:5557");
        assert_eq!(r[0].replay.as_deref(), Some("tcp://gpu-1:5600"));
        assert_eq!(r[1].endpoint, "tcp://gpu-9:5558");
        assert_eq!(r[1].topic, "kv");
        let off = json!({"0": {"enable_kv_cache_events": false, "endpoint": "tcp://*:5557"}});
        assert!(parse_kv_event_sources(&off, "h").is_empty());
        let s = json!({"kv_events": {"publisher": "zmq", "endpoint_host": "*", "endpoint_port_base": 6000,
                                      "replay_endpoint_port_base": 6100, "dp_size": 2, "topic": "", "block_size": 16}});
        let r = parse_server_info(&s, "gpu-2");
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].endpoint, "tcp://gpu-2:6001");
        assert_eq!(r[1].replay.as_deref(), Some("tcp://gpu-2:6101"));
        assert!(parse_server_info(&json!({"kv_events": null}), "h").is_empty());
    }
}
