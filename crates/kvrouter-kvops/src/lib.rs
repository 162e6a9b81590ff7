//! kv-ops/1 index workloads: load a file, replay it against an index, measure.
//!
//! A kv-ops/1 file (made by `kv-ops-gen` from a request trace) is a header line
//! and then one op per line: `store`, `remove`, `clear` (KV events of a
//! simulated cluster) and `query` (a routing lookup with the exact expected
//! per-worker overlap). [`Workload::load`] parses the whole file first, so the
//! replay measures the index and not the JSON parser; [`replay`] drives any
//! [`ReplayTarget`] op by op, times every query, checks every answer, and
//! returns the [`Report`] that `kvrouter bench index` and the side-by-side
//! comparison crate both print, so the two are measured by the same code.

#![deny(missing_docs)]

mod load;
mod measure;
mod replay;

pub use load::{Header, LoadError, Op, Workload};
pub use measure::{cpu_seconds, peak_rss_mb, reset_peak_rss, rss_mb};
pub use replay::{ReplayTarget, Report, replay};
