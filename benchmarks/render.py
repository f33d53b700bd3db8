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
            "vs eager | vs compile | denoise+decode s | encode s | warm-up s | PSNR dB vs sdserve |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in records:
        if r.get("latency_s") is None:
            continue
        st = r.get("stages") or {}
        gen = st["denoise_s"] + st["decode_s"] if st else None
        rows.append(f"| {name} | {r['workload']} | {r['variant']} | {r['batch']} | {fmt(r['latency_s'])} | "
                    f"{fmt(r['img_per_s'], 2)} | {fmt(r.get('peak_vram_gib'), 2)} | {fmt(r.get('peak_reserved_gib'), 2)} | "
                    f"{fmt(r.get('mfu'), 2)} | {fmt(r.get('speedup_vs_diffusers-eager'), 2)} | "
                    f"{fmt(r.get('speedup_vs_diffusers-compile'), 2)} | {fmt(gen)} | {fmt(st.get('encode_s'))} | "
                    f"{fmt(r.get('ready_s', r.get('warmup_s')), 1)} | {fmt((r.get('quality') or {}).get('psnr_db'), 1)} |")
    return "\n".join(rows)


def auto_table(records) -> str:
    rows = ["| workload | budget GiB | AUTO picks | estimated peak GiB |", "|---|---|---|---|"]
    for _, r in records:
        if r.get("variant") == "auto-choice":
            rows.append(f"| {r['workload']} | {r['budget_gib']} | {r['memory_level']} | {r['estimate_gib']} |")
    return "\n".join(rows)


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
    text = open(doc).read()
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: body, text, flags=re.S)
    open(doc, "w").write(text)
    print(f"rendered {len(records)} records into {doc}")


if __name__ == "__main__":
    main()
