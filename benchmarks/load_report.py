"""The open-loop load records (benchmarks/load.py) on disk, and their markdown tables for docs/benchmarks.md.

    python -m benchmarks.load_report                          print the tables of benchmarks/results/load/
    python -m benchmarks.load_report DIR_OR_FILE... --doc docs/benchmarks.md
                                                              ... and put them between the LOAD markers there
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
from typing import Any

START, END = "<!-- LOAD:START -->", "<!-- LOAD:END -->"


def _f(v, nd: int = 3) -> str:
    return "" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _key(r: dict):
    return (str(r.get("model")), str(r.get("profile")), str(r.get("admission") or r.get("admission_requested")),
            str(r.get("tag") or ""), r.get("rate_fraction") or 0)


def _batches(hist: dict | None) -> str:
    """'8: 40, 4: 3': batch sizes, largest first, with how many requests rode in each."""
    return ", ".join(f"{k}: {v}" for k, v in sorted((hist or {}).items(), key=lambda kv: -int(kv[0])))


def table(records: list[dict]) -> str:
    """One row per (model, profile, admission, run tag, rate); then each run's saturation per profile; then
    per-size rows of the records with several sizes (mixed-shapes). The tag tells runs apart (code and machine
    differ between them: compare ratios within one run)."""
    records = sorted(records, key=_key)
    rows = ["| model | profile | admission | run | rate x cap | offered req/s | throughput req/s | p50 s | p95 s | p99 s | "
            "queue p99 s | unloaded p50 s | p99 / unloaded | max stall s | recompiles | ok / sent | batch sizes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        c = r["counts"]
        errors = ", ".join(f"{k} {v}" for k, v in c["errors"].items())
        rows.append(f"| {r['model']} | {r['profile']} | {r.get('admission') or r.get('admission_requested')} | "
                    f"{r.get('tag') or ''} | {r['rate_fraction']:g} | {_f(r['offered_rps'], 2)} | {_f(r['throughput_rps'], 2)} | "
                    f"{_f(r['p50_s'])} | {_f(r['p95_s'])} | {_f(r['p99_s'])} | {_f(r['queue_p99_s'])} | "
                    f"{_f(r['unloaded_p50_s'])} | {_f(r['p99_over_unloaded'], 2)} | {_f(r['max_stall_s'], 2)} | "
                    f"{_f(r['recompiles'])} | {c['ok']} / {c['sent']}{' (' + errors + ')' if errors else ''} | "
                    f"{_batches(r['batch_size_histogram'])} |")
    out = ["\n".join(rows)]
    sat = {}
    for r in records:
        if r.get("saturation"):
            sat[_key(r)[:4]] = (r, r["saturation"])
    if sat:
        rows = ["| model | profile | admission | run | saturation req/s | vs uniform | steady req/s | vs uniform | p99 s | "
                "concurrency | batch sizes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for (model, profile, admission, tag), (r, s) in sorted(sat.items()):
            uniform = (sat.get((model, "uniform", admission, tag)) or (None, {}))[1]

            def ratio(field):
                return s[field] / uniform[field] if s.get(field) and uniform.get(field) else None
            rows.append(f"| {model} | {profile} | {admission} | {tag} | {_f(s['rps'], 2)} | {_f(ratio('rps'), 2)} | "
                        f"{_f(s.get('steady_rps'), 2)} | {_f(ratio('steady_rps'), 2)} | {_f(s['p99_s'])} | "
                        f"{s['concurrency']} | {_batches(s['batch_size_histogram'])} |")
        out.append("\n".join(rows))
    shaped = [r for r in records if len(r.get("per_shape") or {}) > 1]
    if shaped:
        rows = ["| model | profile | admission | run | rate x cap | size | ok / sent | p50 s | p99 s | unloaded p50 s | "
                "p99 / unloaded |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in shaped:
            for size, s in r["per_shape"].items():
                rows.append(f"| {r['model']} | {r['profile']} | {r.get('admission') or r.get('admission_requested')} "
                            f"| {r.get('tag') or ''} | {r['rate_fraction']:g} | {size} | {s['ok']} / {s['sent']} | {_f(s['p50_s'])} | "
                            f"{_f(s['p99_s'])} | {_f(s['unloaded_p50_s'])} | {_f(s['p99_over_unloaded'], 2)} |")
        out.append("\n".join(rows))
    return "\n\n".join(out)


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "none"


def capacity_from_records(path: str, model: str | None, capacity_profile: str) -> tuple[float, str]:
    """(capacity_rps, where from) of the newest load record in `path` (a record or a folder of them) of the same
    model and capacity profile: later calls of a split run reuse the first call's capacity, so every call offers
    the same rates."""
    import glob

    files = sorted(glob.glob(os.path.join(path, "*.json")), key=os.path.getmtime) if os.path.isdir(path) else [path]
    for f in reversed(files):
        with open(f, encoding="utf-8") as fh:
            rec = json.load(fh)
        if rec.get("bench") == "load" and rec.get("capacity_rps") and rec.get("capacity_profile") == \
                capacity_profile and (model is None or rec.get("model") == model):
            first = str(rec["capacity_from"]).split(" (from ")[0]  # as measured, not the chain of reuses
            return rec["capacity_rps"], f"{first} (from {os.path.basename(f)})"
    raise ValueError(f"--capacity-from {path}: no load record of model {model} with capacity profile "
                     f"{capacity_profile}")


def write_record(out_dir: str, rec: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    name = "-".join(_slug(p) for p in (rec["date"], rec["device"], rec["model"], rec["profile"],
                                       rec["admission"] or "default", f"r{rec['rate_fraction']:g}", rec["tag"]) if p)
    path = os.path.join(out_dir, name + ".json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(rec, fh, indent=1, default=str)
        fh.write("\n")
    return path


def load_records(paths: list[str]) -> list[dict]:
    files: list[str] = []
    for path in paths:
        files += sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path]
    records = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
        if data.get("bench") == "load":
            records.append(data)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", default=["benchmarks/results/load"], help="record files or folders")
    p.add_argument("--doc", help=f"also replace the text between {START} and {END} in this markdown file")
    args = p.parse_args(argv)
    text = table(load_records(args.paths))
    print(text)
    if args.doc:
        with open(args.doc, encoding="utf-8") as fh:
            doc = fh.read()
        if START not in doc or END not in doc:
            p.error(f"{args.doc} has no {START} ... {END} markers")
        doc = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", doc, flags=re.S)
        with open(args.doc, "w", encoding="utf-8") as fh:
            fh.write(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
