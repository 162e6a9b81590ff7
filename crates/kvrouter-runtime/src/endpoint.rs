//! Endpoint ids and instances.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `namespace.component.endpoint`, the address of a service (`dyn://` prefix accepted).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId {
    /// Deployment namespace (`dynamo`).
    pub namespace: String,
    /// Component (`backend`, `router`).
    pub component: String,
    /// Endpoint (`generate`).
    pub endpoint: String,
}

/// Why a string is not an endpoint id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not namespace.component.endpoint (letters, digits, '_' and '-' in each part)")]
pub struct EndpointParseError(pub String);

impl FromStr for EndpointId {
    type Err = EndpointParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let body = s.strip_prefix("dyn://").unwrap_or(s);
        let parts: Vec<&str> = body.split('.').collect();
        let ok = parts.len() == 3
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            });
        if !ok {
            return Err(EndpointParseError(s.to_string()));
        }
        Ok(Self {
            namespace: parts[0].into(),
            component: parts[1].into(),
            endpoint: parts[2].into(),
        })
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.namespace, self.component, self.endpoint)
    }
}

impl Serialize for EndpointId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EndpointId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl EndpointId {
    /// Key prefix under which its instances register (`ns/component/endpoint/`).
    pub fn key_prefix(&self) -> String {
        format!("{}/{}/{}/", self.namespace, self.component, self.endpoint)
    }

    /// A component-scoped event subject, e.g. `namespace.dynamo.component.backend.kv-events`.
    pub fn subject(&self, name: &str) -> String {
        format!(
            "namespace.{}.component.{}.{name}",
            self.namespace, self.component
        )
    }
}

/// A serving instance's id (unique per process and endpoint).
pub type InstanceId = u64;

/// One registered instance of an endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Its id.
    pub id: InstanceId,
    /// The endpoint it serves.
    pub endpoint: EndpointId,
    /// Where to reach it (`tcp://host:port`).
    pub address: String,
    /// What it declares (for workers: [`WorkerMetadata`] as JSON).
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// What a worker declares when it registers (the router's runtime config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerMetadata {
    /// Model served.
    pub model_name: String,
    /// KV block size in tokens.
    pub block_size: u32,
    /// KV blocks per rank.
    pub total_kv_blocks: u64,
    /// Running requests at most.
    pub max_num_seqs: u64,
    /// Tokens per forward pass.
    pub max_num_batched_tokens: u64,
    /// Data-parallel ranks.
    pub data_parallel_size: u32,
    /// Whether the worker keeps a log of its KV events and answers recovery
    /// queries on [`crate::subjects::kv_query_endpoint`] (reference §7.2).
    /// Absent means no: only kvrouter's own workers are known to answer.
    #[serde(default)]
    pub enable_local_indexer: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let e: EndpointId = "dyn://ns.backend.generate".parse().unwrap();
        assert_eq!(e.to_string(), "ns.backend.generate");
        assert_eq!(e.key_prefix(), "ns/backend/generate/");
        assert_eq!(
            e.subject("kv-events"),
            "namespace.ns.component.backend.kv-events"
        );
        for bad in ["a.b", "a..c", "a.b.c.d", "a.b c.d", ""] {
            assert!(bad.parse::<EndpointId>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, "\"ns.backend.generate\"");
        assert_eq!(serde_json::from_str::<EndpointId>(&json).unwrap(), e);
    }
}
