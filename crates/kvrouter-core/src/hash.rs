//! Block hashing, bit-exact with the engines' and Dynamo's router hashing.
//!
//! A prompt is cut into blocks of `block_size` tokens; the trailing partial block
//! is dropped because no engine caches it. Each full block gets a
//! [`LocalBlockHash`]: XXH3-64 with seed 1337 over the block's tokens as
//! little-endian `u32` bytes, followed by the block's multimodal object hashes
//! (`u64` LE, sorted ascending). The hash depends on the block's content only,
//! never on its position; position enters through the radix tree's edges and
//! through the rolling [`SequenceHash`] (`seq[0] = local[0]`,
//! `seq[i] = xxh3(LE(seq[i-1]) ‖ LE(local[i]))`). A LoRA adapter changes the
//! seed to `1337 + xxh3(name)` so adapters never share cache entries.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Seed of every kvrouter block hash (`XXH3_SEED` in the reference).
pub const XXH3_SEED: u64 = 1337;

macro_rules! hash_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                Self(v)
            }
        }
    };
}

hash_newtype!(
    /// Hash of one block's content (tokens and multimodal hashes): the radix tree's edge key.
    LocalBlockHash
);
hash_newtype!(
    /// Router-side rolling hash of a whole prefix up to and including a block.
    SequenceHash
);
hash_newtype!(
    /// The engine's own cumulative hash of a block: opaque, used only as a lookup id.
    ExternalSequenceBlockHash
);

impl ExternalSequenceBlockHash {
    /// Engines written in Python publish signed hashes; the bits are kept as they are.
    pub fn from_i64(v: i64) -> Self {
        Self(v as u64)
    }
}

/// One multimodal object that overlaps a block (an image, an audio clip...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmObjectInfo {
    /// Content hash of the object.
    pub mm_hash: u64,
    /// Token ranges `[start, end)` the object occupies.
    #[serde(default)]
    pub offsets: Vec<(usize, usize)>,
}

/// Extra per-block information that changes the block's hash.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BlockExtraInfo {
    /// Multimodal objects overlapping the block.
    pub mm_objects: Vec<MmObjectInfo>,
}

/// Hash of raw bytes with the router's seed (`compute_hash` in the reference).
#[inline]
pub fn compute_hash(bytes: &[u8]) -> u64 {
    xxh3_64_with_seed(bytes, XXH3_SEED)
}

/// Hash of one block's raw bytes (golden vector: `b"test data"` → 13226331709069118873).
#[inline]
pub fn compute_block_hash(bytes: &[u8]) -> LocalBlockHash {
    LocalBlockHash(compute_hash(bytes))
}

/// The seed for a LoRA adapter: `1337 + xxh3(name)` (default seed 0); an empty name is no LoRA.
pub fn lora_seed(lora_name: Option<&str>) -> u64 {
    match lora_name {
        Some(name) if !name.is_empty() => XXH3_SEED.wrapping_add(xxh3_64(name.as_bytes())),
        _ => XXH3_SEED,
    }
}

/// Computes local block hashes for token sequences at one block size.
///
/// Reuses one scratch buffer, so hashing a prompt allocates only its result.
#[derive(Debug, Clone)]
pub struct BlockHasher {
    block_size: usize,
    seed: u64,
    scratch: Vec<u8>,
}

impl BlockHasher {
    /// A hasher for `block_size`-token blocks, optionally for a LoRA adapter.
    ///
    /// # Panics
    /// If `block_size` is 0 (a configuration error caught at validation time).
    pub fn new(block_size: usize, lora_name: Option<&str>) -> Self {
        assert!(block_size > 0, "block_size must be at least 1");
        Self {
            block_size,
            seed: lora_seed(lora_name),
            scratch: Vec::new(),
        }
    }

    /// Block size in tokens.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Hashes of the full blocks of `tokens`; `extra[i]`, when given, belongs to block `i`.
    pub fn block_hashes(
        &mut self,
        tokens: &[u32],
        extra: Option<&[Option<BlockExtraInfo>]>,
    ) -> Vec<LocalBlockHash> {
        let mut out = Vec::with_capacity(tokens.len() / self.block_size);
        self.block_hashes_into(tokens, extra, &mut out);
        out
    }

    /// Like [`Self::block_hashes`], appending to `out`.
    pub fn block_hashes_into(
        &mut self,
        tokens: &[u32],
        extra: Option<&[Option<BlockExtraInfo>]>,
        out: &mut Vec<LocalBlockHash>,
    ) {
        for (i, chunk) in tokens.chunks_exact(self.block_size).enumerate() {
            let info = extra.and_then(|e| e.get(i)).and_then(Option::as_ref);
            out.push(self.hash_block(chunk, info));
        }
    }

    fn hash_block(&mut self, tokens: &[u32], info: Option<&BlockExtraInfo>) -> LocalBlockHash {
        let mm_empty = info.is_none_or(|i| i.mm_objects.is_empty());
        if cfg!(target_endian = "little") && mm_empty {
            // The in-memory layout already is the wire layout: hash it in place.
            return LocalBlockHash(xxh3_64_with_seed(bytemuck::cast_slice(tokens), self.seed));
        }
        self.scratch.clear();
        for t in tokens {
            self.scratch.extend_from_slice(&t.to_le_bytes());
        }
        if let Some(info) = info {
            let mut mm: Vec<u64> = info.mm_objects.iter().map(|o| o.mm_hash).collect();
            mm.sort_unstable();
            for h in mm {
                self.scratch.extend_from_slice(&h.to_le_bytes());
            }
        }
        LocalBlockHash(xxh3_64_with_seed(&self.scratch, self.seed))
    }
}

/// Local block hashes of `tokens` (no LoRA, no multimodal data).
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<LocalBlockHash> {
    BlockHasher::new(block_size, None).block_hashes(tokens, None)
}

/// The rolling sequence hash of each prefix of `local`.
pub fn sequence_hashes(local: &[LocalBlockHash]) -> Vec<SequenceHash> {
    let mut out = Vec::with_capacity(local.len());
    let mut prev: Option<u64> = None;
    for h in local {
        let next = match prev {
            None => h.0,
            Some(p) => {
                let mut buf = [0u8; 16];
                buf[..8].copy_from_slice(&p.to_le_bytes());
                buf[8..].copy_from_slice(&h.0.to_le_bytes());
                compute_hash(&buf)
            }
        };
        out.push(SequenceHash(next));
        prev = Some(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_golden_vector() {
        assert_eq!(compute_block_hash(b"test data").0, 13226331709069118873);
    }

    #[test]
    fn partial_block_is_dropped() {
        let tokens: Vec<u32> = (0..10).collect();
        assert_eq!(block_hashes(&tokens, 4).len(), 2);
        assert!(block_hashes(&tokens[..3], 4).is_empty());
    }

    #[test]
    fn hash_is_position_independent() {
        let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8];
        let b: Vec<u32> = vec![5, 6, 7, 8, 1, 2, 3, 4];
        let ha = block_hashes(&a, 4);
        let hb = block_hashes(&b, 4);
        assert_eq!(ha[0], hb[1]);
        assert_eq!(ha[1], hb[0]);
    }

    #[test]
    fn empty_lora_name_is_no_lora() {
        assert_eq!(lora_seed(Some("")), XXH3_SEED);
        assert_ne!(lora_seed(Some("adapter")), XXH3_SEED);
    }

    #[test]
    fn mm_hashes_are_order_independent() {
        let tokens = [1u32, 2, 3, 4];
        let obj = |h| MmObjectInfo {
            mm_hash: h,
            offsets: vec![],
        };
        let x = Some(BlockExtraInfo {
            mm_objects: vec![obj(9), obj(3)],
        });
        let y = Some(BlockExtraInfo {
            mm_objects: vec![obj(3), obj(9)],
        });
        let mut hasher = BlockHasher::new(4, None);
        let hx = hasher.block_hashes(&tokens, Some(&[x]));
        let hy = hasher.block_hashes(&tokens, Some(&[y]));
        assert_eq!(hx, hy);
        assert_ne!(hx, hasher.block_hashes(&tokens, None));
    }

    #[test]
    fn sequence_hash_starts_with_local() {
        let local = block_hashes(&(0..12).collect::<Vec<u32>>(), 4);
        let seq = sequence_hashes(&local);
        assert_eq!(seq[0].0, local[0].0);
        assert_ne!(seq[1].0, local[1].0);
    }
}
