//! Every engine shape of `spec/engines.md` §0 and §8, as bytes the engines'
//! own encoder (msgspec) writes, decoded to what the fixture says
//! (`tools/engine_fixtures.py` made them).

use bytes::Bytes;
use kvrouter_engines::replay::parse_reply;
use kvrouter_engines::wire::{EngineEvent, decode_batch};
use serde_json::{Value, json};

fn fixtures() -> Value {
    serde_json::from_str(include_str!("fixtures/engine_events.json")).unwrap()
}

fn as_json(ev: &EngineEvent) -> Value {
    match ev {
        EngineEvent::Stored(s) => json!({
            "type": "stored", "block_hashes": s.block_hashes, "parent": s.parent_block_hash,
            "token_ids": s.token_ids, "block_size": s.block_size, "medium": s.medium,
            "lora_name": s.lora_name, "group_idx": s.group_idx, "salted": s.salted,
        }),
        EngineEvent::Removed(r) => json!({
            "type": "removed", "block_hashes": r.block_hashes, "medium": r.medium,
            "group_idx": r.group_idx,
        }),
        EngineEvent::AllCleared => json!({"type": "cleared"}),
    }
}

#[test]
fn every_engine_shape_decodes() {
    let f = fixtures();
    let batches = f["batches"].as_object().unwrap();
    assert!(batches.len() >= 11);
    for (name, case) in batches {
        let bytes = hex::decode(case["hex"].as_str().unwrap()).unwrap();
        let b = decode_batch(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(b.skipped.is_empty(), "{name}: skipped {:?}", b.skipped);
        let got: Vec<Value> = b.events.iter().map(as_json).collect();
        assert_eq!(
            json!({"dp_rank": b.dp_rank, "events": got}),
            case["expect"],
            "{name}"
        );
    }
}

#[test]
fn both_replay_layouts() {
    let f = fixtures();
    for name in ["replay-3-frames", "replay-4-frames"] {
        let msgs: Vec<Vec<Bytes>> = f["replies"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                m.as_array()
                    .unwrap()
                    .iter()
                    .map(|h| Bytes::from(hex::decode(h.as_str().unwrap()).unwrap()))
                    .collect()
            })
            .collect();
        let first = parse_reply(msgs[0].clone()).unwrap();
        assert_eq!(first, Some((5, Bytes::from_static(b"\x93"))), "{name}");
        assert_eq!(
            parse_reply(msgs[1].clone()).unwrap(),
            None,
            "{name}: end marker"
        );
    }
    assert!(parse_reply(vec![Bytes::new(), Bytes::from_static(b"x")]).is_err());
    assert!(
        parse_reply(vec![
            Bytes::new(),
            Bytes::from_static(b"short"),
            Bytes::from_static(b"p")
        ])
        .is_err()
    );
}
