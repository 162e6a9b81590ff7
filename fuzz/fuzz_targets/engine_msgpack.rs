//! Fuzzes the engines' ZeroMQ payload decoder (vLLM / SGLang msgpack batches,
//! array and map forms) and the translation into router events, applied to
//! an index whose invariants must hold: never a panic, never a bad tree.
#![no_main]

use kvrouter_core::{RadixIndex, WorkerKey};
use kvrouter_engines::translate::{RankTranslator, Translated};
use kvrouter_engines::wire::decode_batch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = decode_batch(data) else {
        return;
    };
    let key = WorkerKey::new(1, batch.dp_rank.unwrap_or(0));
    let mut t = RankTranslator::new(key, 4);
    let mut index = RadixIndex::new();
    for ev in batch.events {
        match t.translate(ev, |_, _| {}) {
            Some(Translated::Event(ev)) => {
                let _ = index.apply_event(&ev);
                if let Err(e) = index.check_invariants() {
                    panic!("invariant broken after {ev:?}: {e}");
                }
            }
            Some(Translated::Reset) => index.remove_worker_rank(key),
            _ => {}
        }
    }
});
