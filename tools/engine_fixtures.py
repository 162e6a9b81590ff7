#!/usr/bin/env python3
"""Golden KV-event payloads of every engine shape, as hex, for the Rust decoder's tests.

The struct definitions below restate, in this project's own words, the field lists
that ../shared/spec/engines.md gives for each engine version (vLLM 0.11 / 0.21 / 0.22 /
0.33, SGLang 0.5.12 / 0.5.23, Dynamo's mocker 1.6.1, Dynamo's TensorRT-LLM example).
msgspec encodes them exactly as the engines' own msgspec structs do (array_like →
every declared field, tag first; map → "type" first, defaults omitted).

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install msgspec==0.23.0 msgpack
    /tmp/fx/bin/python tools/engine_fixtures.py > crates/kvrouter-engines/tests/fixtures/engine_events.json
"""
import json
from typing import Any, Optional, Union

import msgpack
import msgspec

Hash = Union[int, bytes]


def family(array_like: bool):
    """One engine version's event structs, encoded as arrays or maps."""

    class Base(msgspec.Struct, array_like=array_like, omit_defaults=True, tag=True):
        pass

    return Base


# --- vLLM 0.11: store has 7 slots (…, lora_id, medium), remove 3 -----------------------
V11 = family(True)


class V11Stored(V11, tag="BlockStored"):
    block_hashes: list
    parent_block_hash: Optional[Hash]
    token_ids: list
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]


class V11Removed(V11, tag="BlockRemoved"):
    block_hashes: list
    medium: Optional[str]


# --- vLLM 0.21: + lora_name, extra_keys, group_idx (10 slots); remove + group_idx ------
V21 = family(True)


class V21Stored(V21, tag="BlockStored"):
    block_hashes: list
    parent_block_hash: Optional[Hash]
    token_ids: list
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]
    lora_name: Optional[str]
    extra_keys: Optional[list] = None
    group_idx: Optional[int] = None


class V21Removed(V21, tag="BlockRemoved"):
    block_hashes: list
    medium: Optional[str]
    group_idx: Optional[int] = None


class V21Cleared(V21, tag="AllBlocksCleared"):
    pass


# --- vLLM 0.22: + kv_cache_spec_kind, kv_cache_spec_sliding_window (12 slots) ----------
V22 = family(True)


class V22Stored(V22, tag="BlockStored"):
    block_hashes: list
    parent_block_hash: Optional[Hash]
    token_ids: list
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]
    lora_name: Optional[str]
    extra_keys: Optional[list] = None
    group_idx: Optional[int] = None
    kv_cache_spec_kind: Optional[str] = None
    kv_cache_spec_sliding_window: Optional[int] = None


# --- vLLM 0.33: map form, later optional keys ------------------------------------------
V33 = family(False)


class V33Stored(V33, tag="BlockStored"):
    block_hashes: list
    parent_block_hash: Optional[Hash]
    token_ids: list
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]
    lora_name: Optional[str]
    extra_keys: Optional[list] = None
    group_idx: Optional[int] = None
    kv_cache_spec_kind: Optional[str] = None
    kv_cache_spec_sliding_window: Optional[int] = None
    locality: Optional[str] = None
    ownership: Optional[str] = None
    session_id: Optional[str] = None
    lookahead_token_ids: Optional[list] = None


class V33Removed(V33, tag="BlockRemoved"):
    block_hashes: list
    medium: Optional[str]
    group_idx: Optional[int] = None
    locality: Optional[str] = None
    ownership: Optional[str] = None


class V33Cleared(V33, tag="AllBlocksCleared"):
    pass


# --- SGLang 0.5.12: array, 7 slots, signed hashes ---------------------------------------
S12 = family(True)


class S12Stored(S12, tag="BlockStored"):
    block_hashes: list
    parent_block_hash: Optional[int]
    token_ids: list
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str] = None


class S12Removed(S12, tag="BlockRemoved"):
    block_hashes: list
    medium: Optional[str] = None


# --- SGLang 0.5.23: map, + cache_salt, session_id, lora_name -----------------------------
S23 = family(False)


class S23Stored(S23, tag="BlockStored"):
    block_hashes: list
    parent_block_hash: Optional[int]
    token_ids: list
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str] = None
    cache_salt: Optional[str] = None
    session_id: Optional[str] = None
    lora_name: Optional[str] = None


class S23Removed(S23, tag="BlockRemoved"):
    block_hashes: list
    medium: Optional[str] = None


class S23Cleared(S23, tag="AllBlocksCleared"):
    pass


class Batch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list
    dp_rank: Optional[int] = None


ENC = msgspec.msgpack.Encoder()
BIG = 2**64 - 5


def batch(events, rank=0, ts=1.0):
    return ENC.encode(Batch(ts=ts, events=events, dp_rank=rank))


def plain(events, rank=0, ts=1.0):
    """Payloads written with the msgpack module (Dynamo's mocker and TRT-LLM example)."""
    return msgpack.packb([ts, events, rank])


def expect(*events, rank=0):
    return {"dp_rank": rank, "events": list(events)}


def st(hashes, parent, tokens, bs, medium=None, lora_name=None, group_idx=None, salted=False):
    return {"type": "stored", "block_hashes": hashes, "parent": parent, "token_ids": tokens,
            "block_size": bs, "medium": medium, "lora_name": lora_name, "group_idx": group_idx,
            "salted": salted}


def rm(hashes, medium=None, group_idx=None):
    return {"type": "removed", "block_hashes": hashes, "medium": medium, "group_idx": group_idx}


CLR = {"type": "cleared"}
DIGEST = bytes(range(24)) + (9).to_bytes(8, "big")

cases = {
    "vllm-0.11-array": (
        batch([V11Stored([BIG, 7], None, [1, 2, 3, 4], 2, None, "GPU"), V11Removed([7], "GPU")]),
        expect(st([BIG, 7], None, [1, 2, 3, 4], 2, "GPU"), rm([7], "GPU")),
    ),
    "vllm-0.21-array": (
        batch([V21Stored([BIG, 7], None, [1, 2, 3, 4], 2, None, "GPU", None, group_idx=0),
               V21Removed([7], "GPU", group_idx=0), V21Cleared()]),
        expect(st([BIG, 7], None, [1, 2, 3, 4], 2, "GPU", group_idx=0), rm([7], "GPU", 0), CLR),
    ),
    "vllm-0.22-array": (
        batch([V22Stored([11], 7, [5, 6], 2, None, "GPU", None, [None], 0, "full_attention", None)],
              rank=1),
        expect(st([11], 7, [5, 6], 2, "GPU", group_idx=0), rank=1),
    ),
    "vllm-0.33-map": (
        batch([V33Stored([BIG, 7], None, [1, 2, 3, 4], 2, None, "GPU", None, group_idx=0),
               V33Removed([7], "GPU", group_idx=0), V33Cleared()]),
        expect(st([BIG, 7], None, [1, 2, 3, 4], 2, "GPU", group_idx=0), rm([7], "GPU", 0), CLR),
    ),
    "vllm-0.33-map-lora-salt": (
        batch([V33Stored([3], None, [1, 2], 2, None, "GPU", "sql", [("sql", "salt-1")], 0),
               V33Stored([4], None, [1, 2], 2, None, "GPU", "sql", [("sql",)], 0)]),
        expect(st([3], None, [1, 2], 2, "GPU", "sql", 0, salted=True),
               st([4], None, [1, 2], 2, "GPU", "sql", 0)),
    ),
    "vllm-bytes-hash": (
        batch([V33Stored([DIGEST], DIGEST, [1, 2], 2, None, "GPU", None)]),
        expect(st([9], 9, [1, 2], 2, "GPU")),
    ),
    "sglang-0.5.12-array": (
        batch([S12Stored([-5, 7], -9, list(range(8)), 4, None, "GPU"), S12Removed([7], "GPU")],
              rank=1, ts=1.5),
        expect(st([2**64 - 5, 7], 2**64 - 9, list(range(8)), 4, "GPU"), rm([7], "GPU"), rank=1),
    ),
    "sglang-0.5.23-map": (
        batch([S23Stored([-5, 7], None, list(range(8)), 4, None, "GPU"), S23Removed([7], "GPU"),
               S23Cleared(), S23Stored([8], None, [1, 2, 3, 4], 4, None, "CPU_PINNED"),
               S23Stored([12], None, [1, 2, 3, 4], 4, None, "GPU", cache_salt="tenant-a")],
              rank=1, ts=1.5),
        expect(st([2**64 - 5, 7], None, list(range(8)), 4, "GPU"), rm([7], "GPU"), CLR,
               st([8], None, [1, 2, 3, 4], 4, "CPU_PINNED"),
               st([12], None, [1, 2, 3, 4], 4, "GPU", salted=True), rank=1),
    ),
    "sglang-bigram": (
        batch([S23Stored([5], None, [[10, 11], [11, 12]], 2, None, "GPU")]),
        expect(st([5], None, [10, 11], 2, "GPU")),
    ),
    "dynamo-mocker-1.6.1-map": (
        plain([{"type": "BlockRemoved", "block_hashes": [3], "group_idx": 0},
               {"type": "BlockStored", "block_hashes": [BIG], "parent_block_hash": 3,
                "token_ids": [1, 2], "block_size": 2, "group_idx": 0}]),
        expect(rm([3], group_idx=0), st([BIG], 3, [1, 2], 2, group_idx=0)),
    ),
    "trtllm-example-map": (
        plain([{"type": "BlockStored", "block_hashes": [21, 22], "token_ids": [1, 2, 3, 4],
                "block_size": 2}, {"type": "BlockRemoved", "block_hashes": [22]}]),
        expect(st([21, 22], None, [1, 2, 3, 4], 2), rm([22])),
    ),
}

# Replay replies as the DEALER sees them: 3 frames (vLLM ≤ 0.25, SGLang ≤ 0.5.21) and
# 4 frames with the topic (vLLM ≥ 0.26, SGLang ≥ 0.5.22, Dynamo's mocker).
seq = (5).to_bytes(8, "big")
end = b"\xff" * 8
replies = {
    "replay-3-frames": [[b"", seq, b"\x93"], [b"", end, b""]],
    "replay-4-frames": [[b"", b"kv", seq, b"\x93"], [b"", b"", end, b""]],
}

print(json.dumps({
    "batches": {k: {"hex": p.hex(), "expect": e} for k, (p, e) in cases.items()},
    "replies": {k: [[f.hex() for f in m] for m in msgs] for k, msgs in replies.items()},
}, indent=1))
