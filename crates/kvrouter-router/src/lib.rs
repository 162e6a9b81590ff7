//! kvrouter's routing services, over the runtime's planes.
//!
//! - [`router`]: the KV router — index, active sequences, busy detection and
//!   selection behind one handle, with an RAII guard per routed request.
//! - [`workers`]: a pool of engine workers followed through discovery and the
//!   event plane; `generate` the routed call that streams a worker's outputs
//!   back, retried before the first response and migrated after it.
//! - [`standalone`]: the standalone router service (`{ns}.router.generate`,
//!   `{ns}.router.best_worker_id`).
//! - [`engines`]: external OpenAI-HTTP engines (vLLM, SGLang, …) followed
//!   through their ZeroMQ KV events, health and metrics; [`passthrough`]: their
//!   answers streamed back unchanged while the router follows each request.
//! - [`sidecar`]: `kvrouter engine`, an external engine registered in
//!   discovery, its KV events and load republished on the event plane.
//! - [`disagg`]: prefill through a prefill pool's router before decoding.
//! - [`durable`]: durable KV events (JetStream consumer, snapshots, purge);
//!   without it, `recover` repairs lost events by asking the workers.
//! - [`global`]: the global router (pool selection by size and latency target).
//! - [`sync`]: active-sequence events shared by router replicas.
//! - [`metrics`]: the router's Prometheus metrics under the reference names.

pub mod admit;
pub mod disagg;
mod down;
pub mod durable;
pub mod engines;
mod generate;
pub mod global;
pub mod metrics;
pub mod passthrough;
pub mod predicted;
mod recover;
pub mod router;
pub mod sidecar;
pub mod standalone;
pub mod sync;
pub mod workers;

pub use generate::{GenerateStream, MAX_ATTEMPTS};
pub use kvrouter_core::llm::{LlmEngineOutput, PreprocessedRequest};
pub use metrics::RouterMetrics;
pub use router::{ActiveRequest, KvRouter, RouteError, RouteQuery, Routing};
pub use workers::{GenerateError, WorkerPool};
