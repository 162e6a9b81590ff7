#!/usr/bin/env python3
"""Run an engine's *own* KV-event publisher (vLLM's or SGLang's kv_events.py, taken
from its published wheel) without the engine, to test kvrouter against the real bytes.

The engines' packages import torch and CUDA at the top, so this loader puts small
stand-in modules for the few imports kv_events.py needs into sys.modules (a logger,
the block-hash type, four network helpers, a dataclass decorator, SGLang's parallel
context) and then loads the real files with importlib. Everything that encodes and
sends — the msgspec structs, ZmqEventPublisher, its replay ROUTER — is the engine's.

    engine_publisher.py --engine vllm --root DIR --endpoint tcp://127.0.0.1:P \
        [--replay tcp://127.0.0.1:R] [--rank 1] [--batches 20] [--block-size 4]

DIR holds the unpacked wheel files (vllm/... or sglang/...). The publisher binds
endpoint and replay with the rank added to their ports (the engines' own rule),
publishes `batches` stores (family i = tokens i*1000 …, one block each) and then one
removal of family 0, prints "published", and keeps serving replays until stdin closes.
"""
import argparse
import dataclasses
import importlib.util
import logging
import socket
import sys
import time
import types


def stub(name, **attrs):
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so submodules can be registered under it
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules[name] = mod
    return mod


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def split_zmq_path(path):
    scheme, rest = path.split("://", 1)
    if scheme in ("ipc", "inproc"):
        return scheme, rest, ""
    host, _, port = rest.rpartition(":")
    return scheme, host.strip("[]"), port


def load_vllm(root):
    for pkg in ("vllm", "vllm.config", "vllm.distributed", "vllm.utils", "vllm.v1", "vllm.v1.core"):
        stub(pkg)
    stub("vllm.logger", init_logger=logging.getLogger)
    stub("vllm.v1.core.kv_cache_utils", ExternalBlockHash=bytes | int)
    stub("vllm.utils.network_utils",
         get_ip=lambda: "127.0.0.1",
         get_tcp_uri=lambda ip, port: f"tcp://{ip}:{port}",
         is_valid_ipv6_address=lambda a: ":" in a,
         split_zmq_path=split_zmq_path)
    stub("vllm.config.utils", config=dataclasses.dataclass)
    load("vllm.config.kv_events", f"{root}/vllm/config/kv_events.py")
    return load("vllm.distributed.kv_events", f"{root}/vllm/distributed/kv_events.py")


def load_sglang(root):
    for pkg in ("sglang", "sglang.srt", "sglang.srt.disaggregation", "sglang.srt.utils"):
        stub(pkg)
    # Only consulted for the publishing-rank decision, which the caller makes here.
    stub("sglang.srt.runtime_context", get_parallel=lambda: None)
    try:
        load("sglang.srt.utils.network", f"{root}/sglang/srt/utils/network.py")
    except FileNotFoundError:
        pass
    return load("sglang.srt.disaggregation.kv_events", f"{root}/sglang/srt/disaggregation/kv_events.py")


def make(cls, **known):
    """An event of the engine's own struct: known fields set, other required ones None."""
    fields = cls.__struct_fields__
    required = len(fields) - len(cls.__struct_defaults__)
    kwargs = {f: known.get(f) for f in fields[:required]}
    kwargs.update({k: v for k, v in known.items() if k in fields})
    return cls(**kwargs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["vllm", "sglang"], required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--replay")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--interval", type=float, default=0.02)
    a = ap.parse_args()
    kv = load_vllm(a.root) if a.engine == "vllm" else load_sglang(a.root)
    pub = kv.ZmqEventPublisher(a.rank, endpoint=a.endpoint, replay_endpoint=a.replay)
    print("ready", flush=True)
    bs = a.block_size

    def block_hash(i):
        # vLLM: unsigned 64-bit values above i64::MAX; SGLang: signed, often negative.
        return (2**64 - 1 - i) if a.engine == "vllm" else -(i + 1)

    for i in range(a.batches):
        ev = make(kv.BlockStored, block_hashes=[block_hash(i)], parent_block_hash=None,
                  token_ids=[i * 1000 + t for t in range(bs)], block_size=bs,
                  lora_id=None, medium="GPU", lora_name=None)
        pub.publish(kv.KVEventBatch(ts=time.time(), events=[ev]))
        time.sleep(a.interval)
    rm = make(kv.BlockRemoved, block_hashes=[block_hash(0)], medium="GPU")
    pub.publish(kv.KVEventBatch(ts=time.time(), events=[rm]))
    print("published", flush=True)
    sys.stdin.read()
    pub.shutdown()


if __name__ == "__main__":
    socket.setdefaulttimeout(5)
    main()
