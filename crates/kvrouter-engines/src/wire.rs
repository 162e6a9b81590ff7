//! The engines' KV-event payloads: one msgpack batch `[ts, events, dp_rank]`
//! per ZeroMQ message, decoded without a schema so that every shape vLLM,
//! SGLang, TensorRT-LLM and Dynamo's mocker publish reads the same way.
//!
//! Rules (`spec/engines.md` §0): each event is either an array `[tag, f1, …]`
//! in declaration order or a map `{"type": tag, field: value, …}`, and one
//! batch may mix both; unknown keys and extra trailing positions are ignored;
//! a missing optional field is `None`; a hash is a u64, an i64 (cast) or bytes
//! (the last 8, big-endian); `token_ids` are flat or bigram pairs (the first of
//! each pair is the token). A bad event is reported and skipped, never the
//! whole batch; a payload that is no batch at all is one error.

use rmpv::Value;

/// A decoded batch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventBatch {
    /// Publisher's wall clock, seconds.
    pub ts: f64,
    /// The events that decoded, in order.
    pub events: Vec<EngineEvent>,
    /// The publisher's data-parallel rank, when it filled the slot.
    pub dp_rank: Option<u32>,
    /// Events that did not decode (their position and why).
    pub skipped: Vec<(usize, WireError)>,
}

/// One engine event.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Blocks entered the cache.
    Stored(BlockStored),
    /// Blocks left the cache.
    Removed(BlockRemoved),
    /// Every block of the publishing rank was dropped.
    AllCleared,
}

/// `BlockStored`, with the fields a prefix router uses.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockStored {
    /// Engine hashes of the blocks, root-most first.
    pub block_hashes: Vec<u64>,
    /// Engine hash of the block before the first one; `None` at the root.
    pub parent_block_hash: Option<u64>,
    /// Every block's tokens, concatenated.
    pub token_ids: Vec<u32>,
    /// Tokens per block in this event.
    pub block_size: u32,
    /// LoRA adapter name (`lora_name`), if any.
    pub lora_name: Option<String>,
    /// Storage medium (`None` = the device).
    pub medium: Option<String>,
    /// KV-cache group of hybrid models.
    pub group_idx: Option<i64>,
    /// The group's attention kind (`kv_cache_spec_kind`).
    pub kind: Option<String>,
    /// The prefix cache is namespaced by a salt (`cache_salt`, or a string in
    /// the first block's `extra_keys`).
    pub salted: bool,
}

/// `BlockRemoved`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockRemoved {
    /// Engine hashes of the evicted blocks.
    pub block_hashes: Vec<u64>,
    /// Storage medium (`None` = the device).
    pub medium: Option<String>,
    /// KV-cache group of hybrid models.
    pub group_idx: Option<i64>,
}

/// Why a payload or an event did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The bytes are not one msgpack value.
    #[error("not msgpack: {0}")]
    NotMsgpack(String),
    /// The value is not a `[ts, events, dp_rank]` array.
    #[error("not an event batch: {0}")]
    NotBatch(&'static str),
    /// An event with a tag this decoder does not know.
    #[error("unknown event type {0:?}")]
    UnknownTag(String),
    /// An event whose fields do not fit its type.
    #[error("malformed {tag} event: {reason}")]
    BadEvent {
        /// The event's tag.
        tag: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl WireError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            WireError::NotMsgpack(_) => "not_msgpack",
            WireError::NotBatch(_) => "not_batch",
            WireError::UnknownTag(_) => "unknown_event",
            WireError::BadEvent { .. } => "bad_event",
        }
    }
}

/// Decodes one batch payload.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, WireError> {
    let mut cursor = payload;
    let value =
        rmpv::decode::read_value(&mut cursor).map_err(|e| WireError::NotMsgpack(e.to_string()))?;
    let Value::Array(parts) = value else {
        return Err(WireError::NotBatch("the batch is not an array"));
    };
    if parts.len() < 2 {
        return Err(WireError::NotBatch("the batch has fewer than 2 slots"));
    }
    let ts = match &parts[0] {
        Value::F64(f) => *f,
        Value::F32(f) => f64::from(*f),
        v => v
            .as_i64()
            .map(|i| i as f64)
            .ok_or(WireError::NotBatch("ts is not a number"))?,
    };
    let Value::Array(raw) = &parts[1] else {
        return Err(WireError::NotBatch("events is not an array"));
    };
    let dp_rank = parts
        .get(2)
        .and_then(Value::as_u64)
        .and_then(|r| u32::try_from(r).ok());
    let mut batch = EventBatch {
        ts,
        dp_rank,
        ..Default::default()
    };
    for (i, ev) in raw.iter().enumerate() {
        match decode_event(ev) {
            Ok(e) => batch.events.push(e),
            Err(e) => batch.skipped.push((i, e)),
        }
    }
    Ok(batch)
}

/// An event's fields by name, whichever form it came in.
struct Fields<'a> {
    tag: &'a str,
    array: Option<&'a [Value]>,
    map: Option<&'a [(Value, Value)]>,
}

/// Array positions (after the tag) of the fields read, per event type.
const STORED_POS: &[&str] = &[
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
];
const REMOVED_POS: &[&str] = &["block_hashes", "medium", "group_idx"];

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        let v = if let Some(a) = self.array {
            let order = if self.tag == "BlockStored" {
                STORED_POS
            } else {
                REMOVED_POS
            };
            order
                .iter()
                .position(|n| *n == name)
                .and_then(|p| a.get(p + 1))
        } else {
            self.map
                .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name)))
                .map(|(_, v)| v)
        };
        v.filter(|v| !v.is_nil())
    }
}

fn decode_event(ev: &Value) -> Result<EngineEvent, WireError> {
    let fields = match ev {
        Value::Array(a) => Fields {
            tag: a
                .first()
                .and_then(Value::as_str)
                .ok_or(WireError::UnknownTag("(array without a tag)".into()))?,
            array: Some(a),
            map: None,
        },
        Value::Map(m) => Fields {
            tag: m
                .iter()
                .find(|(k, _)| k.as_str() == Some("type"))
                .and_then(|(_, v)| v.as_str())
                .ok_or(WireError::UnknownTag("(map without \"type\")".into()))?,
            array: None,
            map: Some(m),
        },
        _ => return Err(WireError::UnknownTag("(neither array nor map)".into())),
    };
    match fields.tag {
        "BlockStored" => stored(&fields).map(EngineEvent::Stored),
        "BlockRemoved" => removed(&fields).map(EngineEvent::Removed),
        "AllBlocksCleared" => Ok(EngineEvent::AllCleared),
        other => Err(WireError::UnknownTag(other.to_string())),
    }
}

fn bad(tag: &'static str, reason: impl Into<String>) -> WireError {
    WireError::BadEvent {
        tag,
        reason: reason.into(),
    }
}

/// A block hash: u64, i64 (two's complement) or bytes (last 8, big-endian).
pub fn hash_of(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => i.as_u64().or_else(|| i.as_i64().map(|s| s as u64)),
        Value::Binary(b) => Some(fold_bytes(b)),
        _ => None,
    }
}

fn fold_bytes(b: &[u8]) -> u64 {
    let tail = &b[b.len().saturating_sub(8)..];
    tail.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

fn hashes(tag: &'static str, v: Option<&Value>) -> Result<Vec<u64>, WireError> {
    let Some(Value::Array(a)) = v else {
        return Err(bad(tag, "block_hashes is missing or not a list"));
    };
    a.iter()
        .map(|h| hash_of(h).ok_or_else(|| bad(tag, format!("block hash {h} is not a hash"))))
        .collect()
}

fn tokens(v: Option<&Value>) -> Result<Vec<u32>, WireError> {
    let Some(Value::Array(a)) = v else {
        return Err(bad("BlockStored", "token_ids is missing or not a list"));
    };
    a.iter()
        .map(|t| {
            let t = match t {
                // EAGLE bigram pages: [t_i, t_{i+1}] stands for t_i.
                Value::Array(pair) => pair.first().unwrap_or(&Value::Nil),
                t => t,
            };
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| bad("BlockStored", format!("token id {t} is not a u32")))
        })
        .collect()
}

fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_string)
}

fn stored(f: &Fields<'_>) -> Result<BlockStored, WireError> {
    const TAG: &str = "BlockStored";
    let block_hashes = hashes(TAG, f.get("block_hashes"))?;
    let parent_block_hash = match f.get("parent_block_hash") {
        None => None,
        Some(v) => Some(hash_of(v).ok_or_else(|| bad(TAG, "parent_block_hash is not a hash"))?),
    };
    let token_ids = tokens(f.get("token_ids"))?;
    let block_size = f
        .get("block_size")
        .and_then(Value::as_u64)
        .and_then(|b| u32::try_from(b).ok())
        .filter(|b| *b > 0)
        .ok_or_else(|| bad(TAG, "block_size is missing or not a positive integer"))?;
    let lora_name = text(f.get("lora_name"));
    // A salt is a string in the first block's extra keys besides the LoRA
    // name and multimodal ids (vLLM), or a `cache_salt` (SGLang).
    let salted_extra = match f.get("extra_keys") {
        Some(Value::Array(keys)) => keys.first().is_some_and(|k| match k {
            Value::Array(items) => {
                let strings = items.iter().filter(|i| i.is_str() && !is_mm_id(i)).count();
                strings > usize::from(lora_name.is_some())
            }
            _ => false,
        }),
        _ => false,
    };
    let salted = salted_extra || f.get("cache_salt").is_some();
    Ok(BlockStored {
        block_hashes,
        parent_block_hash,
        token_ids,
        block_size,
        lora_name,
        medium: text(f.get("medium")),
        group_idx: f.get("group_idx").and_then(Value::as_i64),
        kind: text(f.get("kv_cache_spec_kind")),
        salted,
    })
}

/// A multimodal identifier in `extra_keys`: 64 hex characters.
fn is_mm_id(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn removed(f: &Fields<'_>) -> Result<BlockRemoved, WireError> {
    Ok(BlockRemoved {
        block_hashes: hashes("BlockRemoved", f.get("block_hashes"))?,
        medium: text(f.get("medium")),
        group_idx: f.get("group_idx").and_then(Value::as_i64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    fn s(x: &str) -> Value {
        Value::from(x)
    }

    #[test]
    fn mixed_forms_in_one_batch() {
        let arr = Value::Array(vec![
            s("BlockStored"),
            Value::Array(vec![Value::from(u64::MAX - 4), Value::from(7)]),
            Value::Nil,
            Value::Array((1..=4).map(Value::from).collect()),
            Value::from(2),
            Value::Nil,
            s("GPU"),
            Value::Nil,
            Value::Nil,
            Value::from(0),
            Value::Nil,
            Value::Nil,
            s("future field"),
        ]);
        let map = Value::Map(vec![
            (s("type"), s("BlockRemoved")),
            (s("block_hashes"), Value::Array(vec![Value::from(-5)])),
            (s("unknown"), Value::from(1)),
        ]);
        let payload = Value::Array(vec![
            Value::F64(1.5),
            Value::Array(vec![arr, map, Value::Array(vec![s("AllBlocksCleared")])]),
            Value::from(3),
        ]);
        let b = decode_batch(&enc(&payload)).unwrap();
        assert_eq!(b.dp_rank, Some(3));
        assert!(b.skipped.is_empty());
        let EngineEvent::Stored(st) = &b.events[0] else {
            panic!()
        };
        assert_eq!(st.block_hashes, vec![u64::MAX - 4, 7]);
        assert_eq!(st.token_ids, vec![1, 2, 3, 4]);
        assert_eq!(st.medium.as_deref(), Some("GPU"));
        assert_eq!(st.group_idx, Some(0));
        assert_eq!(
            b.events[1],
            EngineEvent::Removed(BlockRemoved {
                block_hashes: vec![(-5i64) as u64],
                ..Default::default()
            })
        );
        assert_eq!(b.events[2], EngineEvent::AllCleared);
    }

    #[test]
    fn byte_hashes_and_bigrams() {
        let mut digest = vec![0xAAu8; 24];
        digest.extend_from_slice(&42u64.to_be_bytes());
        let ev = Value::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), Value::Array(vec![Value::Binary(digest)])),
            (
                s("token_ids"),
                Value::Array(vec![
                    Value::Array(vec![Value::from(5), Value::from(6)]),
                    Value::Array(vec![Value::from(6), Value::from(9)]),
                ]),
            ),
            (s("block_size"), Value::from(2)),
        ]);
        let payload = Value::Array(vec![Value::F64(0.0), Value::Array(vec![ev])]);
        let b = decode_batch(&enc(&payload)).unwrap();
        let EngineEvent::Stored(st) = &b.events[0] else {
            panic!()
        };
        assert_eq!(st.block_hashes, vec![42]);
        assert_eq!(st.token_ids, vec![5, 6]);
        assert_eq!(b.dp_rank, None);
    }

    #[test]
    fn bad_events_are_skipped_not_fatal() {
        let payload = Value::Array(vec![
            Value::F64(0.0),
            Value::Array(vec![
                Value::Array(vec![s("BlockMoved")]),
                Value::Map(vec![(s("type"), s("BlockStored"))]),
                Value::Array(vec![s("AllBlocksCleared")]),
                Value::from(3),
            ]),
            Value::from(0),
        ]);
        let b = decode_batch(&enc(&payload)).unwrap();
        assert_eq!(b.events, vec![EngineEvent::AllCleared]);
        let labels: Vec<_> = b.skipped.iter().map(|(i, e)| (*i, e.label())).collect();
        assert_eq!(
            labels,
            vec![(0, "unknown_event"), (1, "bad_event"), (3, "unknown_event")]
        );
        assert!(matches!(
            decode_batch(b"\x93\x01"),
            Err(WireError::NotMsgpack(_))
        ));
        assert!(matches!(
            decode_batch(&enc(&Value::Map(vec![]))),
            Err(WireError::NotBatch(_))
        ));
        assert!(decode_batch(&[]).is_err());
    }

    #[test]
    fn salts_are_recognised() {
        let mut ev = vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), Value::Array(vec![Value::from(1)])),
            (
                s("token_ids"),
                Value::Array(vec![Value::from(1), Value::from(2)]),
            ),
            (s("block_size"), Value::from(2)),
        ];
        let plain = decode_event(&Value::Map(ev.clone())).unwrap();
        assert!(matches!(plain, EngineEvent::Stored(ref st) if !st.salted));
        ev.push((
            s("extra_keys"),
            Value::Array(vec![Value::Array(vec![s("my-salt")])]),
        ));
        let salted = decode_event(&Value::Map(ev.clone())).unwrap();
        assert!(matches!(salted, EngineEvent::Stored(ref st) if st.salted));
        ev.pop();
        ev.push((
            s("extra_keys"),
            Value::Array(vec![Value::Array(vec![
                s(&"ab".repeat(32)),
                Value::from(0),
            ])]),
        ));
        let mm = decode_event(&Value::Map(ev)).unwrap();
        assert!(matches!(mm, EngineEvent::Stored(ref st) if !st.salted));
    }
}
