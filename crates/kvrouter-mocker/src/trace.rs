//! Mooncake-style request traces, and prompts synthesised from them.
//!
//! A trace line is `{"timestamp": ms, "input_length": n, "output_length": m,
//! "hash_ids": [...]}`; each id stands for one 512-token block, and equal ids
//! mean the same content after the same prefix. [`PromptBuilder`] expands ids
//! into tokens deterministically (token `j` of block `h` is a fixed function of
//! `(h, j)`), so equal ids give equal tokens at any engine block size, and
//! hashes them into the engine's blocks with the router's own hashing.

use std::io::BufRead;
use std::path::Path;

use kvrouter_core::hash::{BlockHasher, LocalBlockHash, SequenceHash, sequence_hashes};
use serde::Deserialize;

/// Tokens per trace block in Mooncake traces.
pub const TRACE_BLOCK_TOKENS: usize = 512;
/// Vocabulary of synthesised tokens.
const VOCAB: u64 = 128_000;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TraceRequest {
    /// Arrival, ms from the start of the trace.
    pub timestamp: f64,
    /// Prompt tokens.
    pub input_length: usize,
    /// Generated tokens.
    pub output_length: usize,
    /// Prompt as trace block ids.
    pub hash_ids: Vec<u64>,
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// I/O.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A malformed line.
    #[error("{path}:{line}: {message}")]
    Malformed {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Reads a JSONL trace, keeping at most `limit` requests.
pub fn load(path: &Path, limit: Option<usize>) -> Result<Vec<TraceRequest>, TraceError> {
    let name = path.display().to_string();
    let io = |source| TraceError::Io {
        path: name.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let r: TraceRequest = serde_json::from_str(&line).map_err(|e| TraceError::Malformed {
            path: name.clone(),
            line: i + 1,
            message: e.to_string(),
        })?;
        if r.input_length == 0 {
            return Err(TraceError::Malformed {
                path: name.clone(),
                line: i + 1,
                message: "input_length is 0".into(),
            });
        }
        out.push(r);
    }
    Ok(out)
}

/// Token `j` of trace block `id`.
#[inline]
pub fn token(id: u64, j: usize) -> u32 {
    // splitmix64 of (id, j): cheap, deterministic, well spread.
    let mut z = id
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(j as u64)
        .wrapping_add(0x632b_e59b_d9b4_e019);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) % VOCAB) as u32
}

/// Turns trace requests into engine-block hashes.
#[derive(Debug)]
pub struct PromptBuilder {
    hasher: BlockHasher,
    tokens: Vec<u32>,
}

impl PromptBuilder {
    /// A builder for `block_size`-token engine blocks.
    pub fn new(block_size: usize) -> Self {
        Self {
            hasher: BlockHasher::new(block_size, None),
            tokens: Vec::new(),
        }
    }

    /// The prompt's tokens (ids beyond `hash_ids` continue with fresh content).
    pub fn tokens(&mut self, r: &TraceRequest, request_index: u64) -> &[u32] {
        self.tokens.clear();
        for j in 0..r.input_length {
            let block = j / TRACE_BLOCK_TOKENS;
            let id = r
                .hash_ids
                .get(block)
                .copied()
                // Past the listed ids the content is unique to this request.
                .unwrap_or(u64::MAX - request_index);
            self.tokens.push(token(id, j % TRACE_BLOCK_TOKENS));
        }
        &self.tokens
    }

    /// Local and sequence hashes of the prompt's full engine blocks.
    pub fn hashes(
        &mut self,
        r: &TraceRequest,
        request_index: u64,
    ) -> (Vec<LocalBlockHash>, Vec<SequenceHash>) {
        self.tokens(r, request_index);
        let local = self.hasher.block_hashes(&self.tokens, None);
        let seq = sequence_hashes(&local);
        (local, seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ids: &[u64], len: usize) -> TraceRequest {
        TraceRequest {
            timestamp: 0.0,
            input_length: len,
            output_length: 1,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn equal_ids_give_equal_blocks_at_any_block_size() {
        for bs in [16, 64, 100, 512] {
            let mut b = PromptBuilder::new(bs);
            let (la, sa) = b.hashes(&req(&[0, 1, 2], 1400), 0);
            let (lb, sb) = b.hashes(&req(&[0, 1, 9], 1500), 1);
            let shared = 1024 / bs;
            assert_eq!(la[..shared], lb[..shared], "bs {bs}");
            assert_eq!(sa[..shared], sb[..shared]);
            assert_eq!(la.len(), 1400 / bs);
            if 1024 % bs == 0 && shared < la.len().min(lb.len()) {
                assert_ne!(la[shared], lb[shared], "different id, different block");
            }
        }
    }

    #[test]
    fn reads_the_shared_trace_format() {
        let dir = std::env::temp_dir().join(format!("kvr-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.jsonl");
        std::fs::write(&p, "{\"timestamp\": 0, \"input_length\": 700, \"output_length\": 5, \"hash_ids\": [0, 1]}\n\n{\"timestamp\": 5, \"input_length\": 10, \"output_length\": 2, \"hash_ids\": [0]}\n").unwrap();
        let t = load(&p, None).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(load(&p, Some(1)).unwrap().len(), 1);
        std::fs::write(&p, "{\"timestamp\": 0}\n").unwrap();
        assert!(matches!(
            load(&p, None),
            Err(TraceError::Malformed { line: 1, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
