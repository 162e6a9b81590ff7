#!/usr/bin/env python3
"""Checks that every metric the Grafana dashboard queries is exposed by a
running `kvrouter serve` (started here on a free port, sent a few requests).

Usage: check_dashboard.py KVROUTER_BINARY
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "deploy", "grafana", "kvrouter-dashboard.json")
METRIC = re.compile(r"\b((?:dynamo|kvrouter)_[a-z0-9_]+)")


def queried(dash):
    names = set()
    for p in dash["panels"]:
        for t in p.get("targets", []):
            for m in METRIC.findall(t["expr"]):
                names.add(re.sub(r"_(bucket|sum|count)$", "", m))
    return names


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    names = queried(json.load(open(DASHBOARD)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
    serve = subprocess.Popen(
        [sys.argv[1], "serve", "--http-host", "127.0.0.1", "--http-port", str(port), "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except Exception:
                if time.time() > deadline:
                    print("serve did not become healthy")
                    return 1
                time.sleep(0.2)
        for stream in (True, False, True):
            body = json.dumps({"model": "mock-model", "max_tokens": 8, "stream": stream,
                               "messages": [{"role": "user", "content": "count to ten"}]}).encode()
            req = urllib.request.Request(f"{url}/v1/chat/completions", body, {"content-type": "application/json"})
            urllib.request.urlopen(req, timeout=30).read()
        time.sleep(0.5)
        text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    exposed = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    missing = sorted(names - exposed)
    if missing:
        print(f"the dashboard queries metrics serve does not expose: {missing}")
        return 1
    print(f"dashboard: all {len(names)} metrics it queries are exposed by serve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
