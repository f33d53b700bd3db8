"""Render benchmarks/results/*.json into the tables of docs/benchmarks.md (between the RESULTS markers).

    python -m benchmarks.render
"""
from __future__ import annotations

import glob
import json
import os
import re

START, END = "<!-- RESULTS:START -->", "<!-- RESULTS:END -->"


def fmt(v, nd=3):
    return "" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def table(records) -> str:
    rows = ["| file | workload | variant | batch | latency s | img/s | peak alloc GiB | peak reserved GiB | MFU | "
            "vs eager | vs compile | denoise+decode s | encode s | warm-up s | PSNR dB vs sdserve | copy bound s | "
            "in turns: vs NONE, vs bound |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in records:
        if r.get("latency_s") is None:
            continue
        st = r.get("stages") or {}
        gen = st["denoise_s"] + st["decode_s"] if st else None
        rows.append(f"| {name} | {r['workload']} | {r['variant']} | {r['batch']} | {fmt(r['latency_s'])} | "
                    f"{fmt(r['img_per_s'], 2)} | {fmt(r.get('peak_vram_gib'), 2)} | {fmt(r.get('peak_reserved_gib'), 2)} | "
                    f"{fmt(r.get('mfu'), 2)} | {fmt(r.get('speedup_vs_diffusers-eager'), 2)} | "
                    f"{fmt(r.get('speedup_vs_diffusers-compile'), 2)} | {fmt(gen)} | {fmt(st.get('encode_s'))} | "
                    f"{fmt(r.get('ready_s', r.get('warmup_s')), 1)} | {fmt((r.get('quality') or {}).get('psnr_db'), 1)} | "
                    f"{fmt(r.get('copy_bound_s'))} | "
                    f"{' / '.join(fmt(r.get(k), 2) for k in ('interleaved_vs_first', 'interleaved_vs_bound') if k in r)} |")
    return "\n".join(rows)


def auto_table(records) -> str:
    rows = ["| workload | budget GiB | AUTO picks | estimated peak GiB |", "|---|---|---|---|"]
    for _, r in records:
        if r.get("variant") == "auto-choice":
            rows.append(f"| {r['workload']} | {r['budget_gib']} | {r['memory_level']} | {r['estimate_gib']} |")
    return "\n".join(rows)


PLOT_VARIANTS = ("diffusers-eager", "diffusers-compile", "sdserve", "sdserve-fp8-static", "sdserve-deepcache")
PLOT_COLORS = ("#9e9e9e", "#5c6bc0", "#2e7d32", "#ef6c00", "#00897b")


def latency_plot(records, path: str) -> int:
    """SVG bar chart of the newest batch-1 latency per (workload, variant): no plotting library needed."""
    newest: dict = {}
    for name, r in records:  # files sort by date: later records win; memory-level runs are eager-only, noisier
        if "memory" not in name and r.get("batch") == 1 and r.get("variant") in PLOT_VARIANTS and r.get("latency_s"):
            newest[(r["workload"], r["variant"])] = r["latency_s"]
    workloads = sorted({w for w, _ in newest})
    if not workloads:
        return 0
    top = max(newest.values())
    bar, gap, left, height = 26, 40, 150, 220
    width = left + len(workloads) * (len(PLOT_VARIANTS) * bar + gap) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 90}" font-family="sans-serif" '
           f'font-size="11">', '<text x="10" y="16" font-size="13">Batch-1 latency, H100, seconds (lower is better)</text>']
    for wi, wl in enumerate(workloads):
        x0 = left + wi * (len(PLOT_VARIANTS) * bar + gap)
        out.append(f'<text x="{x0}" y="{height + 50}">{wl}</text>')
        for vi, variant in enumerate(PLOT_VARIANTS):
            if (wl, variant) not in newest:
                continue
            v = newest[(wl, variant)]
            h = v / top * (height - 40)
            x, y = x0 + vi * bar, height + 30 - h
            out.append(f'<rect x="{x}" y="{y:.1f}" width="{bar - 4}" height="{h:.1f}" fill="{PLOT_COLORS[vi]}"/>')
            out.append(f'<text x="{x}" y="{y - 3:.1f}" font-size="9">{v:.2f}</text>')
    for vi, variant in enumerate(PLOT_VARIANTS):
        out.append(f'<rect x="10" y="{30 + vi * 16}" width="10" height="10" fill="{PLOT_COLORS[vi]}"/>'
                   f'<text x="24" y="{39 + vi * 16}">{variant}</text>')
    out.append("</svg>")
    with open(path, "w") as fh:
        fh.write("\n".join(out) + "\n")
    return len(newest)


def main(results="benchmarks/results", doc="docs/benchmarks.md") -> None:
    records, envs = [], []
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        data = json.load(open(path))
        name = os.path.basename(path).removesuffix(".json")
        envs.append(f"- `{name}`: {data['env'].get('device')}, torch {data['env'].get('torch')}, diffusers "
                    f"{data['env'].get('diffusers')}, bf16 matmul {fmt(data['env'].get('bf16_matmul_tflops'), 0)} "
                    f"TFLOP/s, H2D {json.dumps({k: round(v, 1) for k, v in (data['env'].get('h2d_gbps') or {}).items()})} GB/s")
        records += [(name, r) for r in data["records"]]
    body = "\n".join([START, "", *envs, "", table(records), "", "AUTO memory-level choices:", "", auto_table(records),
                      "", END])
    latency_plot(records, os.path.join(os.path.dirname(doc), "benchmarks-latency.svg"))
    text = open(doc).read()
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: body, text, flags=re.S)
    open(doc, "w").write(text)
    print(f"rendered {len(records)} records into {doc}")


if __name__ == "__main__":
    main()
