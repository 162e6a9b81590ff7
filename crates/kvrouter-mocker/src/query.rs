//! The mock worker's answer to KV recovery queries (reference §7.2): each rank
//! records its events in a [`LocalLog`] before publishing them, and a router
//! that lost some (a NATS outage, its own restart) asks this endpoint for the
//! missing events or a dump of the rank's blocks.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use kvrouter_core::error::UpstreamError;
use kvrouter_core::recovery::{KvQuery, LocalLog};
use kvrouter_runtime::request::Handler;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// One rank's log, shared by its engine loop (writer) and the query endpoint.
pub type RankLog = Arc<Mutex<LocalLog>>;

/// Serves `KvQuery` JSON with one `KvQueryReply` JSON response.
pub(crate) struct QueryHandler {
    pub(crate) logs: Vec<RankLog>,
}

impl Handler for QueryHandler {
    fn handle(
        &self,
        request: Bytes,
        _cancel: CancellationToken,
    ) -> BoxStream<'static, Result<Bytes, String>> {
        let reply = serde_json::from_slice::<KvQuery>(&request)
            .map_err(|e| UpstreamError::invalid(format!("invalid KV query: {e}")).to_wire())
            .and_then(|q| {
                let log = self.logs.get(q.dp_rank as usize).ok_or_else(|| {
                    UpstreamError::invalid(format!("no rank {} here", q.dp_rank)).to_wire()
                })?;
                // Built under the lock, serialized outside it: the engine loop waits only for the copy.
                let answer = log.lock().answer(q.start_event_id);
                Ok(Bytes::from(
                    serde_json::to_vec(&answer).expect("replies serialize"),
                ))
            });
        futures::stream::once(async move { reply }).boxed()
    }
}
