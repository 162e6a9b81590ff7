//! What the engine tests share: an index fed as a router feeds it, and free ports.

#![allow(dead_code)]

use kvrouter_core::{RadixIndex, RouterEvent, WorkerKey};
use kvrouter_engines::source::KvEventSink;
use parking_lot::Mutex;

/// A router's index behind the source seam.
#[derive(Default)]
pub struct Index(pub Mutex<RadixIndex>);

impl KvEventSink for Index {
    fn apply_event(&self, ev: RouterEvent) {
        let _ = self.0.lock().apply_event(&ev);
    }
    fn reset_rank(&self, key: WorkerKey) {
        self.0.lock().remove_worker_rank(key);
    }
}

/// A loopback port free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
