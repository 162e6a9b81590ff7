#!/usr/bin/env python3
"""Draws `kvrouter bench http` results (JSON lines) as an SVG: routing overhead
percentiles (µs, log scale) and client TTFT percentiles (ms) per offered load.

    python3 tools/plot_bench_http.py out/bench-http.jsonl out/bench-http.svg
"""
import json
import math
import sys


def main(src, dst):
    runs = [json.loads(l) for l in open(src) if l.strip()]
    runs.sort(key=lambda r: r["offered_rps"])
    w, h, pad = 760, 340, 60
    panel = (w - 3 * pad) / 2
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{w/2}" y="20" text-anchor="middle" font-size="14">kvrouter serve under trace load (8 mock workers, 2 cores)</text>']
    colors = {"p50": "#4c78a8", "p90": "#f58518", "p99": "#e45756"}

    def bars(x0, title, values, unit, log):
        top, bottom = 50, h - 50
        vmax = max(v for r in values for v in r[1].values()) * 1.2
        lo = 1.0 if log else 0.0
        def y(v):
            if log:
                v = max(v, lo)
                return bottom - (math.log10(v) - math.log10(lo)) / (math.log10(vmax) - math.log10(lo)) * (bottom - top)
            return bottom - v / vmax * (bottom - top)
        out.append(f'<text x="{x0 + panel/2}" y="{top - 12}" text-anchor="middle">{title}</text>')
        out.append(f'<line x1="{x0}" y1="{bottom}" x2="{x0 + panel}" y2="{bottom}" stroke="black"/>')
        out.append(f'<line x1="{x0}" y1="{top}" x2="{x0}" y2="{bottom}" stroke="black"/>')
        group = panel / max(len(values), 1)
        for gi, (label, vals) in enumerate(values):
            for k, (name, v) in enumerate(vals.items()):
                bw = group / 4
                bx = x0 + gi * group + bw * (k + 0.5)
                out.append(f'<rect x="{bx:.1f}" y="{y(v):.1f}" width="{bw*0.9:.1f}" height="{bottom - y(v):.1f}" fill="{colors[name]}"/>')
                out.append(f'<text x="{bx + bw*0.45:.1f}" y="{y(v) - 3:.1f}" text-anchor="middle" font-size="10">{v:.0f}</text>')
            out.append(f'<text x="{x0 + (gi + 0.5) * group:.1f}" y="{bottom + 16}" text-anchor="middle">{label}</text>')
        out.append(f'<text x="{x0 - 8}" y="{top}" text-anchor="end" font-size="10">{unit}</text>')

    over = [(f'{r["offered_rps"]:.0f} req/s', {q: r["routing_overhead"][f"{q}_us"] for q in ("p50", "p90", "p99")}) for r in runs]
    ttft = [(f'{r["offered_rps"]:.0f} req/s', {q: r["client_ttft_ms"][q] for q in ("p50", "p90", "p99")}) for r in runs]
    bars(pad, "routing overhead (µs, log scale)", over, "µs", True)
    bars(2 * pad + panel, "client time to first token (ms)", ttft, "ms", False)
    for i, (name, c) in enumerate(colors.items()):
        out.append(f'<rect x="{pad + i*70}" y="{h - 22}" width="12" height="12" fill="{c}"/><text x="{pad + i*70 + 16}" y="{h - 12}">{name}</text>')
    out.append("</svg>")
    open(dst, "w").write("\n".join(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
