//! The mocker: a simulated LLM inference engine, and an offline cluster simulator.
//!
//! [`engine::Engine`] behaves like vLLM where a router can see it: a paged KV
//! cache with prefix caching and LRU eviction of unused blocks
//! ([`blocks::BlockManager`]), continuous batching with chunked prefill under
//! `max_num_seqs` / `max_num_batched_tokens`, preemption when blocks run out,
//! and the reference's polynomial timing model ([`perf`]). It publishes the KV
//! events a real engine publishes (stored with their parent chain, removed on
//! eviction) with per-rank increasing ids, and its load. It is a library with
//! no I/O: the caller owns the clock and advances it step by step.
//!
//! [`sim`] replays a Mooncake trace ([`trace`]) through N engines behind the
//! real router core (index, active sequences, selection) in virtual time, so a
//! whole production hour replays in seconds, once per routing mode, and
//! [`report`] turns the runs into percentiles, a table, JSON and an SVG.
//! [`service`] runs engines live, in real time, as workers on the runtime;
//! [`vllm`] makes such a worker look like a vLLM server from outside (its
//! ZeroMQ KV events and metric names); [`query`] answers routers that lost
//! some of a worker's events.

#![deny(missing_docs)]

pub mod blocks;
pub mod engine;
pub mod perf;
pub mod plot;
pub mod query;
pub mod report;
pub mod service;
pub mod sim;
pub mod synth;
pub mod trace;
pub mod vllm;
