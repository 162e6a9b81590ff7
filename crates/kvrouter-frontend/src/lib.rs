//! kvrouter's OpenAI-compatible frontend.
//!
//! - [`app`]: the axum application (chat and text completions, streaming and
//!   not, models, health, metrics, busy thresholds, router state).
//! - [`openai`]: request bodies and their validation; [`error`]: OpenAI error
//!   JSON with the right status.
//! - [`tokenizer`]: Hugging Face tokenizer, Jinja chat template, streaming
//!   detokenizer; [`stop`]: stop strings over streamed text.
//! - [`metrics`]: `dynamo_frontend_*` metrics.
//! - [`passthrough`]: requests for external engines (`--engine`), forwarded
//!   unchanged and routed by their tokens.
//! - [`server`]: the HTTP server under the routes: connection limit, header
//!   and body timeouts, size limits, OpenAI error JSON for the framework's own
//!   errors, and the two-stage graceful shutdown.
//! - [`serve`]: a frontend over any runtime or over external engines. The
//!   compositions with mock workers (the embedded `kvrouter serve`, the
//!   stand-in vLLM) live in `kvrouter-serve`, so this crate knows no mocker.

pub mod app;
pub mod error;
pub mod metrics;
pub mod openai;
pub(crate) mod passthrough;
pub mod reasoning;
pub mod serve;
pub mod server;
pub mod stop;
pub(crate) mod token_cache;
pub mod tokenizer;

pub use app::{Backend, EngineFacade, Frontend, HttpOptions, app};
pub use serve::{FrontendHandle, RoutingConfig, start_frontend};
pub use tokenizer::Preprocessor;
