//! `--engine URL[,kv-events=ENDPOINT][,replay=ENDPOINT][,dp-size=N]`: one
//! external engine, as an operator names it.
//!
//! `URL` is the engine's OpenAI HTTP server (`http://host:port`, no path).
//! `kv-events` is rank 0's ZeroMQ PUB (`tcp://host:port`); rank r publishes
//! on port + r, as vLLM and SGLang do, and so does `replay`. `dp-size` is the
//! number of data-parallel ranks (default 1). Without `kv-events`, the ports
//! are asked of the engine (vLLM's `/kv_event_sources`, SGLang's
//! `/server_info`); an engine that offers none is routed approximately.

use reqwest::Url;

/// One `--engine` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSpec {
    /// The OpenAI server, without a trailing slash.
    pub url: Url,
    /// Rank 0's KV-event PUB.
    pub kv_events: Option<String>,
    /// Rank 0's replay ROUTER.
    pub replay: Option<String>,
    /// Data-parallel ranks.
    pub dp_size: u32,
}

/// Checks a ZeroMQ endpoint: `tcp://host:port` or `ipc://path`.
pub fn check_endpoint(e: &str) -> Result<(), String> {
    if let Some(path) = e.strip_prefix("ipc://") {
        return if path.is_empty() {
            Err(format!("{e:?}: ipc:// needs a path"))
        } else {
            Ok(())
        };
    }
    let Some(rest) = e.strip_prefix("tcp://") else {
        return Err(format!("{e:?} is not a ZeroMQ endpoint (tcp://host:port)"));
    };
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("{e:?} has no port (tcp://host:port)"))?;
    if host.is_empty() {
        return Err(format!("{e:?} has no host"));
    }
    port.parse::<u16>()
        .map(|_| ())
        .map_err(|_| format!("{e:?}: {port:?} is not a port"))
}

/// The endpoint of rank `rank`: the port moved up by the rank (`ipc://` gets `_dp{rank}`).
pub fn rank_endpoint(base: &str, rank: u32) -> String {
    if rank == 0 {
        return base.to_string();
    }
    if base.starts_with("ipc://") {
        return format!("{base}_dp{rank}");
    }
    match base.rsplit_once(':') {
        Some((host, port)) => match port.parse::<u32>() {
            Ok(p) => format!("{host}:{}", p + rank),
            Err(_) => base.to_string(),
        },
        None => base.to_string(),
    }
}

impl std::str::FromStr for EngineSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let raw = parts.next().unwrap_or_default().trim();
        let url = Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("{raw:?} is not an http(s)://host:port URL"));
        }
        if url.path() != "/" || url.query().is_some() {
            return Err(format!(
                "{raw:?}: give the server's root URL; requests keep their own path"
            ));
        }
        let mut spec = EngineSpec {
            url,
            kv_events: None,
            replay: None,
            dp_size: 1,
        };
        for opt in parts {
            let (k, v) = opt
                .split_once('=')
                .ok_or_else(|| format!("{opt:?} is not key=value"))?;
            match k.trim() {
                "kv-events" => {
                    check_endpoint(v)?;
                    spec.kv_events = Some(v.to_string());
                }
                "replay" => {
                    check_endpoint(v)?;
                    spec.replay = Some(v.to_string());
                }
                "dp-size" => {
                    spec.dp_size = v
                        .parse()
                        .ok()
                        .filter(|n: &u32| *n >= 1)
                        .ok_or_else(|| format!("dp-size={v:?}: must be an integer ≥ 1"))?;
                }
                other => {
                    return Err(format!(
                        "unknown option {other:?} (kv-events, replay, dp-size)"
                    ));
                }
            }
        }
        if spec.replay.is_some() && spec.kv_events.is_none() {
            return Err("replay= needs kv-events= as well".into());
        }
        Ok(spec)
    }
}

impl std::fmt::Display for EngineSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base())?;
        if let Some(k) = &self.kv_events {
            write!(f, ",kv-events={k}")?;
        }
        if let Some(r) = &self.replay {
            write!(f, ",replay={r}")?;
        }
        if self.dp_size != 1 {
            write!(f, ",dp-size={}", self.dp_size)?;
        }
        Ok(())
    }
}

impl serde::Serialize for EngineSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl EngineSpec {
    /// The server's base URL as text, without the trailing slash.
    pub fn base(&self) -> String {
        self.url.as_str().trim_end_matches('/').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_form() {
        let e: EngineSpec =
            "http://127.0.0.1:8101,kv-events=tcp://127.0.0.1:5557,replay=tcp://127.0.0.1:5600,dp-size=2"
                .parse()
                .unwrap();
        assert_eq!(e.base(), "http://127.0.0.1:8101");
        assert_eq!(e.kv_events.as_deref(), Some("tcp://127.0.0.1:5557"));
        assert_eq!(e.dp_size, 2);
        assert_eq!(
            rank_endpoint("tcp://127.0.0.1:5557", 1),
            "tcp://127.0.0.1:5558"
        );
        assert_eq!(rank_endpoint("ipc:///tmp/kv", 2), "ipc:///tmp/kv_dp2");
        assert_eq!(
            e.to_string(),
            "http://127.0.0.1:8101,kv-events=tcp://127.0.0.1:5557,replay=tcp://127.0.0.1:5600,dp-size=2"
        );
        let bare: EngineSpec = "http://gpu-3:8000".parse().unwrap();
        assert_eq!((bare.kv_events, bare.dp_size), (None, 1));
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            "gpu:8000",
            "ftp://h:1",
            "http://h:1/v1",
            "http://h:1,dp-size=0",
            "http://h:1,dp-size=x",
            "http://h:1,kv-events=h:5557",
            "http://h:1,kv-events=tcp://h",
            "http://h:1,kv-events=tcp://h:99999",
            "http://h:1,colour=red",
            "http://h:1,replay=tcp://h:5",
        ] {
            assert!(bad.parse::<EngineSpec>().is_err(), "{bad} accepted");
        }
    }
}
