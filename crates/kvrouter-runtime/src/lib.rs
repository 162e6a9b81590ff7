//! kvrouter's runtime: how instances find each other and talk.
//!
//! Three planes, each a small trait with an in-process implementation (tests,
//! the embedded `serve` mode) and real transports for a fleet:
//! - [`discovery`]: instances register under `namespace.component.endpoint`
//!   with a lease and are watched by clients (in-memory, a shared directory).
//! - [`events`]: fire-and-forget publish/subscribe of KV events and load
//!   (in-process, NATS core).
//! - [`request`]: one request in, a stream of responses out, with back-pressure
//!   and cancellation (multiplexed TCP).
//!
//! A [`node::Node`] bundles the three for one process; [`connect`] builds one
//! from its configuration. Addresses are [`endpoint::EndpointId`]s; every event-plane subject name is
//! in [`subjects`]; wire formats are documented in
//! `docs/runtime.md`.

#![deny(missing_docs)]

pub mod connect;
pub mod discovery;
pub mod endpoint;
pub mod events;
pub mod node;
pub mod request;
pub mod subjects;
pub mod testing;

/// The NATS client the planes use (re-exported so services share its version).
pub use async_nats;
