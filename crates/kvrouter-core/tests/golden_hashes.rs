//! Golden vectors for block and sequence hashing, computed independently by
//! `tools/golden_hashes.py` (Python on the C xxHash library) from the reference
//! text alone. A mismatch means kvrouter would disagree with engines and with
//! Dynamo about which blocks are cached.

use kvrouter_core::hash::{
    BlockExtraInfo, BlockHasher, LocalBlockHash, MmObjectInfo, compute_hash, sequence_hashes,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Raw {
    bytes_utf8: String,
    hash: u64,
}

#[derive(Deserialize)]
struct Case {
    tokens: Vec<u32>,
    block_size: usize,
    lora_name: Option<String>,
    mm_hashes: std::collections::BTreeMap<String, Vec<u64>>,
    local: Vec<u64>,
    sequence: Vec<u64>,
}

#[derive(Deserialize)]
struct Golden {
    raw: Vec<Raw>,
    cases: Vec<Case>,
}

fn golden() -> Golden {
    serde_json::from_str(include_str!("fixtures/hash_golden.json")).expect("fixture parses")
}

#[test]
fn raw_bytes() {
    let g = golden();
    assert!(g.raw.iter().any(|r| r.hash == 13226331709069118873));
    for r in g.raw {
        assert_eq!(
            compute_hash(r.bytes_utf8.as_bytes()),
            r.hash,
            "{:?}",
            r.bytes_utf8
        );
    }
}

#[test]
fn block_and_sequence_hashes() {
    let g = golden();
    assert!(g.cases.len() >= 10);
    for (i, c) in g.cases.iter().enumerate() {
        let blocks = c.tokens.len() / c.block_size;
        let extra: Vec<Option<BlockExtraInfo>> = (0..blocks)
            .map(|b| {
                c.mm_hashes.get(&b.to_string()).map(|hs| BlockExtraInfo {
                    mm_objects: hs
                        .iter()
                        .map(|&mm_hash| MmObjectInfo {
                            mm_hash,
                            offsets: vec![(0, 1)],
                        })
                        .collect(),
                })
            })
            .collect();
        let mut hasher = BlockHasher::new(c.block_size, c.lora_name.as_deref());
        let local = hasher.block_hashes(&c.tokens, Some(&extra));
        let want: Vec<LocalBlockHash> = c.local.iter().copied().map(LocalBlockHash).collect();
        assert_eq!(local, want, "case {i}: local hashes");
        let seq: Vec<u64> = sequence_hashes(&local).iter().map(|s| s.0).collect();
        assert_eq!(seq, c.sequence, "case {i}: sequence hashes");
    }
}
