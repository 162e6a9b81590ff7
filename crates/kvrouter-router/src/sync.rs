//! Router replica sync (`--router-replica-sync`, reference §6.4): routers of
//! one component publish their active-sequence changes and apply each
//! other's, so every replica sees the load all of them placed.
//!
//! Events are JSON on `namespace.{ns}.component.{component}.active_sequences_events`,
//! fire-and-forget. A router ignores its own events (by `router_id`). Only
//! active state is shared — not the KV index (each replica consumes the KV
//! events itself) and not output blocks; a new replica starts with no load.

use kvrouter_core::WorkerKey;
use serde::{Deserialize, Serialize};

/// The worker rank an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncWorker {
    /// Worker.
    pub worker_id: u64,
    /// Rank.
    #[serde(default)]
    pub dp_rank: u32,
}

impl From<WorkerKey> for SyncWorker {
    fn from(w: WorkerKey) -> Self {
        Self {
            worker_id: w.worker_id,
            dp_rank: w.dp_rank,
        }
    }
}

/// A request's arrival, as the routing replica tracked it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddRequest {
    /// Block identities counted as its decode load (`None`: not tracked).
    pub token_sequence: Option<Vec<u64>>,
    /// Prompt length.
    pub isl: usize,
    /// Prompt blocks cached on the worker.
    pub overlap: u32,
    /// Expected output length.
    #[serde(default)]
    pub expected_output_tokens: Option<u32>,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SyncData {
    /// A request was routed.
    AddRequest(AddRequest),
    /// Its prefill completed.
    MarkPrefillCompleted,
    /// It ended.
    Free,
}

/// One active-sequence change (Dynamo's `ActiveSequenceEvent`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveSequenceEvent {
    /// The request.
    pub request_id: String,
    /// Where it runs.
    pub worker: SyncWorker,
    /// The publishing router's instance id.
    pub router_id: u64,
    /// LoRA adapter, if any.
    #[serde(default)]
    pub lora_name: Option<String>,
    /// The change.
    pub data: SyncData,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_matches_the_reference_shape() {
        let e = ActiveSequenceEvent {
            request_id: "r1".into(),
            worker: SyncWorker {
                worker_id: 7,
                dp_rank: 1,
            },
            router_id: 9,
            lora_name: None,
            data: SyncData::AddRequest(AddRequest {
                token_sequence: Some(vec![1, 2]),
                isl: 130,
                overlap: 1,
                expected_output_tokens: None,
            }),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["data"]["AddRequest"]["isl"], 130);
        assert_eq!(v["worker"]["dp_rank"], 1);
        let free: ActiveSequenceEvent = serde_json::from_str(
            r#"{"request_id":"r1","worker":{"worker_id":7},"router_id":9,"data":"Free"}"#,
        )
        .unwrap();
        assert_eq!(free.data, SyncData::Free);
        assert_eq!(serde_json::to_value(&free).unwrap()["data"], "Free");
    }
}
