//! The mock worker's answer to KV recovery queries (reference §7.2): each rank
//! records its events in a [`LocalLog`] before publishing them, and a router
//! that lost some (a NATS outage, its own restart) asks this endpoint for the
//! missing events or a dump of the rank's blocks.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use kvrouter_core::recovery::{LocalLog, answer_query};
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
        let reply = answer_query(&request, |rank, start| {
            self.logs.get(rank as usize).map(|l| l.lock().answer(start))
        })
        .map(Bytes::from)
        .map_err(|e| e.to_wire());
        futures::stream::once(async move { reply }).boxed()
    }
}
