//! Fuzzes the event decoder and the index behind it: every input line is
//! decoded as a `RouterEvent` (JSON); whatever decodes is applied to one index,
//! whose invariants must hold after every event. Never a panic, never a
//! corrupted tree.
#![no_main]

use kvrouter_core::protocols::decode_router_event;
use kvrouter_core::{LocalBlockHash, RadixIndex};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut index = RadixIndex::new();
    for line in data.split(|&b| b == b'\n') {
        if let Ok(ev) = decode_router_event(line) {
            let _ = index.apply_event(&ev);
            if let Err(e) = index.check_invariants() {
                panic!("invariant broken after {ev:?}: {e}");
            }
        }
    }
    let probe: Vec<LocalBlockHash> = (0..8).map(LocalBlockHash).collect();
    let _ = index.find_matches(&probe);
});
