#!/usr/bin/env python3
"""Side-by-side index benchmark: kvrouter vs dynamo-kv-router on kv-ops/1 files.

Generates the three workloads of BENCHMARKS.md with shared/tools/kv-ops-gen (if
missing), then runs `kvrouter bench index` and `dynamo-compare` alternately,
RUNS times each per workload and backend, and reports medians: a Markdown table
on stdout, all raw JSON lines in out/bench-index.json and a chart in
docs/bench-index.svg. Needs release builds of both binaries (`make bench-index`
builds them). Standard library only.
"""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("KVROUTER_SHARED", ROOT.parent / "shared"))
OUT = ROOT / "out"
RUNS = int(os.environ.get("RUNS", "3"))
THREADS = os.environ.get("THREADS", "2")
KVROUTER = ROOT / "target/release/kvrouter"
DYNAMO = ROOT / "bench/dynamo-compare/target/release/dynamo-compare"
WORKLOADS = [
    ("conv", []),
    ("conv-d4s4", ["--dup", "4", "--split", "4"]),
    ("conv-d4s4-c65536", ["--dup", "4", "--split", "4", "--capacity", "65536"]),
]
BACKENDS = [("single", ["--backend", "single"]), ("concurrent", ["--backend", "concurrent", "--threads", THREADS])]


def ensure_workload(name, flags):
    path = OUT / f"{name}.kvops"
    if not path.exists():
        OUT.mkdir(exist_ok=True)
        trace = SHARED / "data/mooncake_conversation_trace.jsonl"
        subprocess.run([str(SHARED / "tools/kv-ops-gen"), str(trace), *flags, "-o", str(path)], check=True)
    return path


def run(binary, path, backend_flags):
    cmd = [str(binary), *(["bench", "index"] if binary == KVROUTER else []), "--ops", str(path), *backend_flags, "--no-progress"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def svg(rows):
    """Grouped bars of median block ops/s per workload and backend."""
    w, h, left, top, bar = 760, 360, 70, 40, 26
    groups = [(r["workload"], r["backend"]) for r in rows if r["impl"] == "kvrouter"]
    peak = max(r["block_ops_per_sec"] for r in rows) * 1.15
    colors = {"kvrouter": "#2b7bb9", "dynamo-kv-router": "#9a9a9a"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<text x="{w/2}" y="18" text-anchor="middle" font-size="14">KV index replay: median block ops/s ({RUNS} runs, release, same machine)</text>']
    plot_h = h - top - 70
    gw = (w - left - 20) / len(groups)
    for i, (wl, be) in enumerate(groups):
        x0 = left + i * gw + (gw - 2 * bar) / 2
        for j, impl in enumerate(["kvrouter", "dynamo-kv-router"]):
            r = next(r for r in rows if r["impl"] == impl and r["workload"] == wl and r["backend"] == be)
            bh = plot_h * r["block_ops_per_sec"] / peak
            x = x0 + j * bar
            parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - bh:.1f}" width="{bar - 2}" height="{bh:.1f}" fill="{colors[impl]}"/>')
            parts.append(f'<text x="{x + bar/2 - 1:.1f}" y="{top + plot_h - bh - 3:.1f}" text-anchor="middle">{r["block_ops_per_sec"]/1e6:.1f}M</text>')
        parts.append(f'<text x="{left + i * gw + gw/2:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{wl}</text>')
        parts.append(f'<text x="{left + i * gw + gw/2:.1f}" y="{top + plot_h + 30}" text-anchor="middle">{be}</text>')
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{w - 20}" y2="{top + plot_h}" stroke="black"/>')
    for k, impl in enumerate(colors):
        parts.append(f'<rect x="{left + k * 170}" y="{h - 22}" width="12" height="12" fill="{colors[impl]}"/>')
        parts.append(f'<text x="{left + k * 170 + 16}" y="{h - 12}">{impl}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main():
    for b in (KVROUTER, DYNAMO):
        if not b.exists():
            sys.exit(f"missing {b.relative_to(ROOT)}: run `make bench-index` (it builds both)")
    raw, rows = [], []
    for name, flags in WORKLOADS:
        path = ensure_workload(name, flags)
        for backend, bflags in BACKENDS:
            res = {"kvrouter": [], "dynamo-kv-router": []}
            for i in range(RUNS):
                # Alternate, and alternate who goes first, so drift hits both alike.
                order = [(KVROUTER, "kvrouter"), (DYNAMO, "dynamo-kv-router")]
                for binary, impl in (order if i % 2 == 0 else order[::-1]):
                    r = run(binary, path, bflags)
                    r["workload"] = name
                    raw.append(r)
                    res[impl].append(r)
                    print(f"{name} {backend} {impl} run {i+1}: {r['block_ops_per_sec']/1e6:.2f}M block ops/s", file=sys.stderr)
            for impl, rs in res.items():
                med = {k: statistics.median(x[k] for x in rs) for k in
                       ("block_ops_per_sec", "query_p50_us", "query_p99_us", "seconds", "cpu_seconds", "peak_rss_mb", "rss_before_replay_mb")}
                rows.append({"impl": impl, "workload": name, "backend": backend, **med,
                             "index_mb": statistics.median(x["peak_rss_mb"] - x["rss_before_replay_mb"] for x in rs),
                             "correct": all(x["correct_queries"] == x["queries"] for x in rs),
                             "apply_errors": max(x["apply_errors"] for x in rs)})
    (OUT / "bench-index.json").write_text(json.dumps({"runs": raw, "medians": rows}, indent=1))
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs/bench-index.svg").write_text(svg(rows))
    print("| workload | backend | impl | block ops/s | ratio | query p50 µs | query p99 µs | index MB (peak−before) | peak RSS MB | correct |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["impl"] == "dynamo-kv-router" and x["workload"] == r["workload"] and x["backend"] == r["backend"])
        print(f"| {r['workload']} | {r['backend']} | {r['impl']} | {r['block_ops_per_sec']/1e6:.2f} M | "
              f"{r['block_ops_per_sec']/base['block_ops_per_sec']:.2f}× | {r['query_p50_us']:.2f} | {r['query_p99_us']:.2f} | "
              f"{r['index_mb']:.1f} | {r['peak_rss_mb']:.1f} | {'100%' if r['correct'] else 'NO'} |")


if __name__ == "__main__":
    main()
