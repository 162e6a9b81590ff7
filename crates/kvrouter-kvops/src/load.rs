//! Parsing kv-ops/1 files into memory.

use std::fmt;
use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};

/// The header line of a kv-ops/1 file.
#[derive(Debug, Clone, Deserialize)]
pub struct Header {
    /// Always `kv-ops/1`.
    pub format: String,
    /// Basename of the source trace.
    #[serde(default)]
    pub trace: String,
    /// Workers of the simulated cluster.
    #[serde(default)]
    pub workers: u64,
    /// Op lines that follow.
    pub ops: u64,
    /// Hashes in all store, remove and query ops.
    pub block_ops: u64,
}

/// One op of the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A routing lookup and its exact answer, `(worker, overlap)` sorted by worker.
    Query {
        /// The prompt's block chain, root first.
        blocks: Box<[u64]>,
        /// Expected non-zero overlaps.
        expect: Box<[(u64, u32)]>,
    },
    /// `worker` cached `blocks` under `parent`.
    Store {
        /// The worker.
        worker: u64,
        /// The cached block the chain continues, or the root.
        parent: Option<u64>,
        /// The chain, root-most first.
        blocks: Box<[u64]>,
    },
    /// `worker` evicted `blocks`.
    Remove {
        /// The worker.
        worker: u64,
        /// Evicted blocks, leaves first.
        blocks: Box<[u64]>,
    },
    /// `worker` dropped its whole cache.
    Clear {
        /// The worker.
        worker: u64,
    },
}

/// A whole kv-ops/1 file, in memory.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The header.
    pub header: Header,
    /// Every op, in order.
    pub ops: Vec<Op>,
    /// Hashes in store, remove and query ops (recounted from the ops).
    pub block_ops: u64,
}

/// Why a kv-ops file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line is not valid kv-ops/1.
    #[error("{path}:{line}: {message}")]
    Malformed {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    op: String,
    #[serde(default)]
    worker: Option<u64>,
    #[serde(default)]
    parent: Option<u64>,
    #[serde(default)]
    blocks: Option<Vec<u64>>,
    #[serde(default)]
    expect: Option<Expect>,
}

/// `{"<worker>": overlap, ...}` parsed without a map allocation per line.
struct Expect(Vec<(u64, u32)>);

impl<'de> Deserialize<'de> for Expect {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Expect;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of worker id strings to overlaps")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Expect, A::Error> {
                let mut v = Vec::with_capacity(m.size_hint().unwrap_or(4));
                while let Some((k, n)) = m.next_entry::<std::borrow::Cow<'de, str>, u32>()? {
                    let w = k
                        .parse::<u64>()
                        .map_err(|_| serde::de::Error::custom(format!("worker id {k:?}")))?;
                    v.push((w, n));
                }
                v.sort_unstable();
                Ok(Expect(v))
            }
        }
        d.deserialize_map(V)
    }
}

impl Workload {
    /// Loads and validates a whole file.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| LoadError::Io {
            path: name.clone(),
            source,
        })?;
        Self::read(std::io::BufReader::with_capacity(1 << 20, file), &name)
    }

    /// Loads from any reader; `name` is used in error messages.
    pub fn read(mut reader: impl BufRead, name: &str) -> Result<Self, LoadError> {
        let bad = |line: usize, message: String| LoadError::Malformed {
            path: name.to_string(),
            line,
            message,
        };
        let mut buf = String::new();
        let mut read_line = |buf: &mut String| {
            buf.clear();
            reader.read_line(buf).map_err(|source| LoadError::Io {
                path: name.to_string(),
                source,
            })
        };
        if read_line(&mut buf)? == 0 {
            return Err(bad(1, "empty file: no kv-ops/1 header".into()));
        }
        let header: Header =
            serde_json::from_str(buf.trim_end()).map_err(|e| bad(1, format!("bad header: {e}")))?;
        if header.format != "kv-ops/1" {
            return Err(bad(1, format!("unsupported format {:?}", header.format)));
        }
        // The header is input too: trust its count only for a modest head start.
        let mut ops = Vec::with_capacity(header.ops.min(1 << 20) as usize);
        let mut block_ops = 0u64;
        let mut lineno = 1;
        loop {
            if read_line(&mut buf)? == 0 {
                break;
            }
            lineno += 1;
            let text = buf.trim_end();
            if text.is_empty() {
                continue;
            }
            let line: Line = serde_json::from_str(text).map_err(|e| bad(lineno, e.to_string()))?;
            let op = to_op(line).map_err(|m| bad(lineno, m))?;
            block_ops += match &op {
                Op::Query { blocks, .. } | Op::Store { blocks, .. } | Op::Remove { blocks, .. } => {
                    blocks.len() as u64
                }
                Op::Clear { .. } => 0,
            };
            ops.push(op);
        }
        if ops.len() as u64 != header.ops {
            return Err(bad(
                lineno,
                format!("header promises {} ops, file has {}", header.ops, ops.len()),
            ));
        }
        Ok(Self {
            header,
            ops,
            block_ops,
        })
    }
}

fn to_op(l: Line) -> Result<Op, String> {
    let worker = || {
        l.worker
            .ok_or_else(|| format!("{} op without \"worker\"", l.op))
    };
    let blocks = |b: Option<Vec<u64>>| {
        b.map(Vec::into_boxed_slice)
            .ok_or_else(|| format!("{} op without \"blocks\"", l.op))
    };
    match l.op.as_str() {
        "query" => Ok(Op::Query {
            blocks: blocks(l.blocks)?,
            expect: l
                .expect
                .ok_or("query op without \"expect\"")?
                .0
                .into_boxed_slice(),
        }),
        "store" => Ok(Op::Store {
            worker: worker()?,
            parent: l.parent,
            blocks: blocks(l.blocks)?,
        }),
        "remove" => Ok(Op::Remove {
            worker: worker()?,
            blocks: blocks(l.blocks)?,
        }),
        "clear" => Ok(Op::Clear { worker: worker()? }),
        other => Err(format!("unknown op {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = r#"{"format":"kv-ops/1","trace":"t.jsonl","workers":2,"capacity":8,"dup":1,"split":1,"requests":1,"ops":4,"block_ops":7,"route":"cost","clear_rate":0.0,"seed":0}"#;

    fn load(body: &str) -> Result<Workload, LoadError> {
        Workload::read(std::io::Cursor::new(format!("{HEADER}\n{body}")), "t.kvops")
    }

    #[test]
    fn parses_every_op() {
        let w = load(concat!(
            "{\"op\":\"query\",\"blocks\":[1,2,3],\"expect\":{\"5\":1,\"0\":2}}\n",
            "{\"op\":\"store\",\"worker\":0,\"parent\":null,\"blocks\":[1,2]}\n",
            "{\"op\":\"remove\",\"worker\":0,\"blocks\":[2,1]}\n",
            "{\"op\":\"clear\",\"worker\":7}\n",
        ))
        .unwrap();
        assert_eq!(w.block_ops, 7);
        assert_eq!(
            w.ops[0],
            Op::Query {
                blocks: vec![1, 2, 3].into(),
                expect: vec![(0, 2), (5, 1)].into()
            }
        );
        assert_eq!(w.ops[3], Op::Clear { worker: 7 });
    }

    #[test]
    fn malformed_lines_name_their_line() {
        for (body, line) in [
            ("{\"op\":\"query\",\"blocks\":[1]}\n", 2),
            (
                "{\"op\":\"store\",\"worker\":0,\"parent\":null,\"blocks\":[1]}\n{\"op\":\"fly\",\"worker\":1}\n",
                3,
            ),
            ("{\"op\":\"store\",\"worker\":-1,\"blocks\":[1]}\n", 2),
            ("not json\n", 2),
            (
                "{\"op\":\"query\",\"blocks\":[1],\"expect\":{\"x\":1}}\n",
                2,
            ),
        ] {
            match load(body) {
                Err(LoadError::Malformed { line: l, .. }) => assert_eq!(l, line, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        assert!(matches!(
            Workload::read(std::io::Cursor::new(""), "e"),
            Err(LoadError::Malformed { line: 1, .. })
        ));
    }

    #[test]
    fn op_count_must_match_header() {
        let err = load("{\"op\":\"clear\",\"worker\":7}\n").unwrap_err();
        assert!(err.to_string().contains("promises 4 ops"), "{err}");
    }
}
