//! Real inference engines behind kvrouter (layer 3, beside the mocker).
//!
//! An engine meets the router through two seams. The **KV-event source**
//! ([`source`]) turns an engine's native stream — ZeroMQ PUB messages whose
//! msgpack batches vLLM, SGLang, TensorRT-LLM and Dynamo's mocker publish
//! ([`wire`]) — into the router's `RouterEvent`s keyed by the router's own
//! block hashes ([`translate`]), recovering gaps through the engine's replay
//! socket ([`replay`]). The **upstream** ([`upstream`]) forwards a routed
//! request to the engine's OpenAI HTTP server and streams the answer back,
//! with one typed error ([`error`]) for every way that can fail; [`tokens`]
//! is the token-level upstream (a tokenized request as a token-id prompt). [`spec`]
//! parses `--engine URL[,kv-events=…][,replay=…][,dp-size=N]`; [`probe`]
//! asks an engine for its model, health, load and event ports; [`publisher`]
//! publishes vLLM-format events for engines kvrouter simulates; [`metrics`]
//! holds what all of this counts.

pub mod metrics;
pub mod observe;
pub mod probe;
pub mod publisher;
pub mod replay;
pub mod source;
pub mod spec;
pub mod tokens;
pub mod translate;
pub mod upstream;
pub mod wire;

pub use kvrouter_core::error::{self, Blame, ErrorCode, UpstreamError};
pub use metrics::EngineMetrics;
pub use source::{KvEventSink, KvEventSource, ZmqSourceConfig};
pub use spec::EngineSpec;
