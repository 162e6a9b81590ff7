//! Disaggregated serving, the frontend's half: before a request is decoded,
//! its prompt is prefilled by a prefill pool reached through that pool's
//! standalone router (`--prefill-router-endpoint`, typically a router with
//! `--no-track-active-blocks`). The prefill worker answers one token and the
//! KV transfer parameters; they ride on the decode request as
//! `prefill_result`, and the decode worker receives the KV instead of
//! computing it.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use kvrouter_core::llm::{LlmEngineOutput, PreprocessedRequest};
use kvrouter_runtime::endpoint::EndpointId;
use kvrouter_runtime::node::Node;
use kvrouter_runtime::request::RequestError;
use serde_json::{Value, json};

use crate::router::RouteError;
use crate::workers::GenerateError;

/// Calls a prefill pool's router.
pub struct PrefillClient {
    node: Node,
    endpoint: EndpointId,
    next: AtomicUsize,
}

impl PrefillClient {
    /// A client of the router serving `endpoint`.
    pub fn new(node: Node, endpoint: EndpointId) -> Self {
        Self {
            node,
            endpoint,
            next: AtomicUsize::new(0),
        }
    }

    /// The router endpoint called.
    pub fn endpoint(&self) -> &EndpointId {
        &self.endpoint
    }

    /// Prefills `req`; returns the `prefill_result` for the decode request.
    pub async fn prefill(
        &self,
        req: &PreprocessedRequest,
        request_id: &str,
    ) -> Result<Value, GenerateError> {
        let routers = self
            .node
            .discovery
            .list(&self.endpoint)
            .await
            .map_err(|e| GenerateError::Protocol {
                worker_id: 0,
                message: format!("discovery: {e}"),
            })?;
        if routers.is_empty() {
            return Err(GenerateError::Route(RouteError::NoWorkers));
        }
        let router = &routers[self.next.fetch_add(1, Ordering::Relaxed) % routers.len()];
        let mut prefill = req.clone();
        prefill.stop_conditions.max_tokens = Some(1);
        prefill.request_id = Some(format!("{request_id}-prefill"));
        let body = Bytes::from(serde_json::to_vec(&prefill).expect("requests serialize"));
        let upstream = |source: RequestError| GenerateError::Upstream {
            worker_id: router.id,
            source,
        };
        let mut responses = self
            .node
            .call(&router.address, body)
            .await
            .map_err(upstream)?;
        let mut params = None;
        while let Some(item) = responses.next().await {
            let bytes = item.map_err(upstream)?;
            let out: LlmEngineOutput =
                serde_json::from_slice(&bytes).map_err(|e| GenerateError::Protocol {
                    worker_id: router.id,
                    message: e.to_string(),
                })?;
            if out.finish_reason.is_some() {
                params = out.disaggregated_params;
            }
        }
        Ok(json!({"disaggregated_params": params}))
    }
}
