//! A small, fast hasher for keys that are already integers or hashes.
//!
//! Block hashes from engines are well mixed, but the kv-ops workloads and
//! dense node ids are small sequential integers, which would cluster in
//! hashbrown's control bytes under an identity hash. One 64×64→128-bit
//! multiply folded to 64 bits mixes both halves for about a nanosecond; SipHash
//! (std's default) costs several times that on every probe of the hot path.
//! Not DoS-resistant: keys come from trusted engines and the router itself.

use std::hash::{BuildHasherDefault, Hasher};

const K1: u64 = 0x243f_6a88_85a3_08d3;
// Multipliers must be odd, or the low bits of the product are always zero.
const K2: u64 = 0x9e37_79b9_7f4a_7c15;
const K3: u64 = 0xbf58_476d_1ce4_e5b9;

/// Multiplies to 128 bits and folds the halves together.
#[inline(always)]
pub(crate) fn fold_mul(a: u64, b: u64) -> u64 {
    let p = (a as u128) * (b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

/// Hash of a tree edge: (parent node, child's local block hash).
#[inline(always)]
pub(crate) fn edge_hash(parent: u32, local: u64) -> u64 {
    fold_mul(local ^ K1, (parent as u64) ^ K3)
}

/// splitmix64's finaliser: a full-avalanche mix of one word, for choices that
/// must spread evenly (rendezvous homes, hash-ring points).
#[inline]
pub(crate) fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `Hasher` for integer keys (see the module docs).
#[derive(Default, Clone, Copy)]
pub(crate) struct IntHasher(u64);

impl Hasher for IntHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(buf));
        }
    }

    #[inline(always)]
    fn write_u64(&mut self, x: u64) {
        self.0 = fold_mul(x ^ K1 ^ self.0.rotate_left(23), K2);
    }

    #[inline(always)]
    fn write_u32(&mut self, x: u32) {
        self.write_u64(x as u64);
    }

    #[inline(always)]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Build-hasher for [`IntHasher`].
pub(crate) type IntBuild = BuildHasherDefault<IntHasher>;

/// A hash map keyed by integers or hashes.
pub(crate) type IntMap<K, V> = hashbrown::HashMap<K, V, IntBuild>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn sequential_keys_spread_over_high_and_low_bits() {
        let b = IntBuild::default();
        let mut top = std::collections::HashSet::new();
        let mut low = std::collections::HashSet::new();
        for k in 0u64..4096 {
            let h = b.hash_one(k);
            top.insert(h >> 57);
            low.insert(h & 0xfff);
        }
        assert_eq!(top.len(), 128, "all 7-bit control tags used");
        assert!(low.len() > 2500, "low bits spread: {}", low.len());
        let mut edges = std::collections::HashSet::new();
        for p in 0u32..64 {
            for l in 0u64..64 {
                edges.insert(edge_hash(p, l) & 0xfff);
            }
        }
        assert!(edges.len() > 2500, "edge hash spread: {}", edges.len());
    }
}
