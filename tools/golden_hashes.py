#!/usr/bin/env python3
"""Regenerates crates/kvrouter-core/tests/fixtures/hash_golden.json.

An independent implementation of kvrouter's block hashing, written from the
reference text only and run on the C xxHash library through the `xxhash` PyPI
package (4.1.0), so the Rust code is checked against code that shares nothing
with it. Usage: pip install xxhash==4.1.0 && python3 tools/golden_hashes.py
"""
import json
import random
import struct
import sys
from pathlib import Path

import xxhash

SEED = 1337


def seed_for(lora):
    if not lora:
        return SEED
    return (SEED + xxhash.xxh3_64_intdigest(lora.encode(), 0)) % 2**64


def local_hashes(tokens, bs, lora=None, mm=None):
    out = []
    seed = seed_for(lora)
    for i in range(len(tokens) // bs):
        data = struct.pack("<%dI" % bs, *tokens[i * bs:(i + 1) * bs])
        if mm and mm.get(i):
            data += b"".join(struct.pack("<Q", h) for h in sorted(mm[i]))
        out.append(xxhash.xxh3_64_intdigest(data, seed))
    return out


def seq_hashes(local):
    out = []
    for i, h in enumerate(local):
        out.append(h if i == 0 else xxhash.xxh3_64_intdigest(struct.pack("<QQ", out[-1], h), SEED))
    return out


def main():
    rng = random.Random(20261122)
    cases = []
    for n, bs, lora, with_mm in [
        (0, 4, None, False), (3, 4, None, False), (16, 16, None, False), (37, 8, None, False),
        (256, 64, None, False), (1000, 128, None, False), (64, 16, "my-adapter", False),
        (64, 16, "", False), (48, 16, None, True), (130, 32, "lora-x", True),
    ]:
        tokens = [rng.randrange(0, 2**32) if n < 40 else rng.randrange(0, 200_000) for _ in range(n)]
        mm = None
        if with_mm:
            mm = {i: [rng.randrange(0, 2**64) for _ in range(rng.randrange(1, 4))]
                  for i in range(n // bs) if rng.random() < 0.6}
        local = local_hashes(tokens, bs, lora, mm)
        cases.append({
            "tokens": tokens, "block_size": bs, "lora_name": lora,
            "mm_hashes": {str(k): v for k, v in (mm or {}).items()},
            "local": local, "sequence": seq_hashes(local),
        })
    doc = {
        "generator": "tools/golden_hashes.py (python xxhash %s)" % xxhash.VERSION,
        "raw": [{"bytes_utf8": s, "hash": xxhash.xxh3_64_intdigest(s.encode(), SEED)}
                for s in ["test data", "", "kvrouter"]],
        "cases": cases,
    }
    out = Path(__file__).resolve().parent.parent / "crates/kvrouter-core/tests/fixtures/hash_golden.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print("wrote", out.name, len(cases), "cases", file=sys.stderr)


if __name__ == "__main__":
    main()
