#!/usr/bin/env python3
"""Routers in front of the same engines: kvrouter `kv`, `kv-sticky` and `round-robin`, and
sglang-router `cache_aware`, each over freshly started stand-in vLLM engines
(`kvrouter mocker --openai-port`), under the same seeded streaming chat load
(`kvrouter bench chat`: shared system prompts over many groups).

Per cell and router it reports the cached fraction as the engines count it
(vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total, summed), client
TTFT p50/p90/p99, failed requests, and the router's CPU milliseconds per request
(utime + stime of the router process and its children, from /proc). Results go to
a JSON file and an SVG chart.

    python3 tools/bench_engines.py --kvrouter target/release/kvrouter \
        --sglang-python out/sglang-router/bin/python --out out/bench-engines
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def wait_http(url, what, secs=60):
    deadline = time.time() + secs
    while time.time() < deadline:
        try:
            if get(url)[0] == 200:
                return
        except Exception:
            pass
        time.sleep(0.1)
    sys.exit(f"{what} never answered {url}")


def cpu_ticks(pid):
    """(utime, stime) of pid and all its descendants, in clock ticks."""
    user, system, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
            for t in os.listdir(f"/proc/{p}/task"):
                kids = open(f"/proc/{p}/task/{t}/children").read().split()
                todo.extend(int(k) for k in kids)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return user, system


def prefix_counts(engine_url):
    _, text = get(f"{engine_url}/metrics")
    q = h = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:prefix_cache_queries_total"):
            q += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:prefix_cache_hits_total"):
            h += float(line.rsplit(" ", 1)[1])
    return q, h


class Engines:
    def __init__(self, kvrouter, n, blocks, speedup):
        self.procs, self.urls, self.specs = [], [], []
        for _ in range(n):
            http, zmq, replay = free_port(), free_port(), free_port()
            p = subprocess.Popen(
                [kvrouter, "mocker", "--openai-host", "127.0.0.1", "--openai-port", str(http),
                 "--zmq-kv-events-port", str(zmq), "--zmq-replay-port", str(replay),
                 "--block-size", "16", "--num-gpu-blocks", str(blocks), "--speedup-ratio", str(speedup)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{http}"
            self.procs.append(p)
            self.urls.append(url)
            self.specs.append(f"{url},kv-events=tcp://127.0.0.1:{zmq},replay=tcp://127.0.0.1:{replay}")
        for u in self.urls:
            wait_http(f"{u}/health", "engine")

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGKILL)
            p.wait()


def start_router(kind, a, engines):
    port = free_port()
    if kind.startswith("kvrouter"):
        mode = {"kvrouter-kv": "kv", "kvrouter-sticky": "kv-sticky", "kvrouter-rr": "round-robin"}[kind]
        cmd = [a.kvrouter, "serve", "--http-host", "127.0.0.1", "--http-port", str(port),
               "--router-mode", mode, "--kv-cache-block-size", "16"]
        for s in engines.specs:
            cmd += ["--engine", s]
        env = dict(os.environ, RUST_LOG="warn")
    else:
        cmd = [a.sglang_python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
               "--port", str(port), "--policy", "cache_aware", "--log-level", "warn",
               "--worker-urls", *engines.urls]
        env = dict(os.environ)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/v1/models", kind)
    return p, url


def run_cell(a, n, blocks, kind):
    engines = Engines(a.kvrouter, n, blocks, a.speedup)
    try:
        router, url = start_router(kind, a, engines)
        try:
            # Warm-up of the connection pools only (one request, not counted by the engines' deltas).
            before_q = before_h = 0.0
            for u in engines.urls:
                q, h = prefix_counts(u)
                before_q += q
                before_h += h
            t0 = cpu_ticks(router.pid)
            out = subprocess.run(
                ["nice", "-n", "19", a.kvrouter, "bench", "chat", "--url", url, "--no-progress",
                 "--groups", str(a.groups), "--system-words", str(a.system_words),
                 "--requests", str(a.requests), "--rate", str(a.rate), "--max-tokens", str(a.max_tokens)],
                capture_output=True, text=True)
            t1 = cpu_ticks(router.pid)
            if not out.stdout.strip():
                sys.exit(f"bench chat printed nothing: {out.stderr}")
            load = json.loads(out.stdout.strip().splitlines()[-1])
            q = h = 0.0
            for u in engines.urls:
                dq, dh = prefix_counts(u)
                q += dq
                h += dh
            hz = os.sysconf("SC_CLK_TCK")
            return {
                "engines": n, "blocks_per_engine": blocks, "router": kind,
                "cached_fraction": (h - before_h) / max(q - before_q, 1.0),
                "ttft_ms": load["ttft_ms"], "failed": load["failed"], "requests": load["requests"],
                "router_cpu_ms_per_request": (sum(t1) - sum(t0)) * 1000.0 / hz / load["requests"],
                # The kernel's share (socket reads and writes, wake-ups) is much the same for
                # every router that streams the same bytes: the floor no router goes below.
                "router_user_ms_per_request": (t1[0] - t0[0]) * 1000.0 / hz / load["requests"],
                "router_system_ms_per_request": (t1[1] - t0[1]) * 1000.0 / hz / load["requests"],
            }
        finally:
            router.send_signal(signal.SIGTERM)
            try:
                router.wait(timeout=5)
            except subprocess.TimeoutExpired:
                router.kill()
    finally:
        engines.stop()


ROUTERS = ["kvrouter-kv", "kvrouter-sticky", "kvrouter-rr", "sglang-cache_aware"]


def svg(results, path):
    cells = []
    for r in results:
        key = (r["engines"], r["blocks_per_engine"])
        if key not in cells:
            cells.append(key)
    routers = ROUTERS
    colors = {"kvrouter-kv": "#4c78a8", "kvrouter-sticky": "#54a24b", "kvrouter-rr": "#9d9d9d",
              "sglang-cache_aware": "#f58518"}
    w, h, pad = 900, 360, 60
    panels = [("cached fraction (engines' count)", lambda r: r["cached_fraction"], 1.0),
              ("TTFT p90 (ms)", lambda r: r["ttft_ms"]["p90"], None),
              ("router CPU ms / request", lambda r: r["router_cpu_ms_per_request"], None)]
    pw = (w - pad * (len(panels) + 1)) / len(panels)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{w/2}" y="18" text-anchor="middle" font-size="14">Routers over the same stand-in vLLM engines (streaming chat, shared system prompts)</text>']
    for i, (title, f, fixed) in enumerate(panels):
        x0, top, bottom = pad + i * (pw + pad), 50, h - 70
        vmax = fixed or max(f(r) for r in results) * 1.15 or 1.0
        out.append(f'<text x="{x0 + pw/2}" y="40" text-anchor="middle">{title}</text>')
        out.append(f'<line x1="{x0}" y1="{bottom}" x2="{x0+pw}" y2="{bottom}" stroke="black"/>')
        gw = pw / len(cells)
        for ci, cell in enumerate(cells):
            bw = gw / (len(routers) + 1)
            for ri, name in enumerate(routers):
                r = next((r for r in results if (r["engines"], r["blocks_per_engine"]) == cell and r["router"] == name), None)
                if r is None:
                    continue
                v = f(r)
                bh = v / vmax * (bottom - top)
                x = x0 + ci * gw + (ri + 0.5) * bw
                out.append(f'<rect x="{x:.1f}" y="{bottom-bh:.1f}" width="{bw*0.9:.1f}" height="{bh:.1f}" fill="{colors[name]}"/>')
                out.append(f'<text x="{x+bw*0.45:.1f}" y="{bottom-bh-3:.1f}" text-anchor="middle" font-size="9">{v:.2f}</text>')
            label = f"{cell[0]} engines" + (" small" if cell[1] < 4096 else "")
            out.append(f'<text x="{x0 + ci*gw + gw/2:.1f}" y="{bottom+14}" text-anchor="middle">{label}</text>')
    for ri, name in enumerate(routers):
        out.append(f'<rect x="{pad + ri*180}" y="{h-30}" width="12" height="12" fill="{colors[name]}"/>')
        out.append(f'<text x="{pad + ri*180 + 16}" y="{h-20}">{name}</text>')
    out.append("</svg>")
    open(path, "w").write("\n".join(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvrouter", required=True)
    ap.add_argument("--sglang-python", required=True)
    ap.add_argument("--out", required=True, help="path prefix: writes PREFIX.json and PREFIX.svg")
    ap.add_argument("--cells", default="2:8192,4:8192,4:600",
                    help="engines:blocks_per_engine, comma-separated")
    ap.add_argument("--groups", type=int, default=31)
    ap.add_argument("--system-words", type=int, default=600)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--speedup", type=float, default=10.0)
    a = ap.parse_args()
    results = []
    for cell in a.cells.split(","):
        n, blocks = (int(x) for x in cell.split(":"))
        for kind in ROUTERS:
            r = run_cell(a, n, blocks, kind)
            print(json.dumps(r), flush=True)
            results.append(r)
    json.dump(results, open(a.out + ".json", "w"), indent=1)
    svg(results, a.out + ".svg")
    print(f"results: {a.out}.json, chart: {a.out}.svg", file=sys.stderr)


if __name__ == "__main__":
    main()
