//! kvrouter's compositions with mock workers, kept out of the frontend crate
//! so that the frontend serves any worker and depends on no simulator:
//! - [`embedded`]: the all-in-one `kvrouter serve`.
//! - [`standin`]: a mock worker dressed as a vLLM server
//!   (`kvrouter mocker --openai-port`), for real-engine deployments without a GPU.

#![deny(missing_docs)]

pub mod embedded;
pub mod standin;

pub use embedded::{Embedded, EmbeddedConfig};
pub use standin::StandIn;
