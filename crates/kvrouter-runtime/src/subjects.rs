//! Every event-plane subject and durable name kvrouter uses, in one place, so
//! a worker, a router and a sidecar can never disagree on where a message goes.
//! The names are the reference's (Dynamo's), so a mixed fleet interoperates.

use crate::endpoint::EndpointId;

/// An endpoint's KV events: `namespace.{ns}.component.{component}.kv-events`.
pub fn kv_events(endpoint: &EndpointId) -> String {
    endpoint.subject("kv-events")
}

/// A namespace's load reports: `namespace.{ns}.kv_metrics`.
pub fn kv_metrics(namespace: &str) -> String {
    format!("namespace.{namespace}.kv_metrics")
}

/// Router replicas' active-sequence changes:
/// `namespace.{ns}.component.{component}.active_sequences_events`.
pub fn active_sequences(endpoint: &EndpointId) -> String {
    endpoint.subject("active_sequences_events")
}

/// Where a worker answers KV recovery queries: its component's
/// `worker_kv_indexer_query` endpoint, under the worker's own instance id
/// (one endpoint for every rank; the rank travels in the query).
pub fn kv_query_endpoint(endpoint: &EndpointId) -> EndpointId {
    EndpointId {
        namespace: endpoint.namespace.clone(),
        component: endpoint.component.clone(),
        endpoint: "worker_kv_indexer_query".into(),
    }
}

/// The object-store bucket of a component's index snapshots (durable mode),
/// before slugging: `namespace.{ns}.component.{component}-radix-bucket`.
pub fn radix_bucket(endpoint: &EndpointId) -> String {
    format!(
        "namespace.{}.component.{}-radix-bucket",
        endpoint.namespace, endpoint.component
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_reference_ones() {
        let e: EndpointId = "ns.backend.generate".parse().unwrap();
        assert_eq!(kv_events(&e), "namespace.ns.component.backend.kv-events");
        assert_eq!(kv_metrics("ns"), "namespace.ns.kv_metrics");
        assert_eq!(
            active_sequences(&e),
            "namespace.ns.component.backend.active_sequences_events"
        );
        assert_eq!(
            kv_query_endpoint(&e).to_string(),
            "ns.backend.worker_kv_indexer_query"
        );
        assert_eq!(
            radix_bucket(&e),
            "namespace.ns.component.backend-radix-bucket"
        );
    }
}
