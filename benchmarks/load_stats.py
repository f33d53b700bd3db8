"""The figures of an open-loop load record, computed from per-request records (benchmarks/load.py).

A request record: {"arrival_s", "done_s", "latency_s", "outcome" ("ok" or an error kind), "queue_s",
"batch_size", "shape"}; times in seconds from the start of the run. Latency is counted from the scheduled arrival,
so a load generator running late cannot hide queueing (no coordinated omission).
"""
from __future__ import annotations

import statistics
from typing import Any, Iterable

from serving.bench import percentile


def latency_stats(values: list[float], prefix: str = "") -> dict[str, float | None]:
    """p50/p95/p99 (linear interpolation between ranks), mean and max; None when there are no values."""
    return {f"{prefix}p50_s": _round(percentile(values, 0.50)), f"{prefix}p95_s": _round(percentile(values, 0.95)),
            f"{prefix}p99_s": _round(percentile(values, 0.99)),
            f"{prefix}mean_s": _round(statistics.fmean(values)) if values else None,
            f"{prefix}max_s": _round(max(values)) if values else None}


def max_stall(spans: Iterable[tuple[float, float]]) -> tuple[float, float | None]:
    """(seconds, start): the longest time during which at least one request was outstanding and none completed.

    A quiet time starts at the last completion, or at the arrival that ended an idle time (nothing outstanding),
    and ends at the next completion. A lone request's whole latency is such a time, so an idle run's stall is its
    longest unloaded latency; under load it shows the engine not finishing anything (a recompile, a long batch).
    """
    spans = list(spans)
    events = sorted([(a, 1) for a, _ in spans] + [(d, -1) for _, d in spans], key=lambda e: (e[0], e[1]))
    outstanding, since, best, best_at = 0, 0.0, 0.0, None
    for t, delta in events:  # completions before arrivals at the same instant
        if delta < 0:
            if t - since > best:
                best, best_at = t - since, since
            since = t
        elif outstanding == 0:
            since = t
        outstanding += delta
    return _round(best), _round(best_at)


def histogram(values: Iterable[Any]) -> dict[str, int]:
    """{value: count}, keys as strings sorted numerically (JSON object keys)."""
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return {str(k): out[k] for k in sorted(out)}


def count_outcomes(requests: list[dict]) -> dict[str, Any]:
    """sent, ok, errors by kind, and `lost`: requests with no outcome at all (must be 0)."""
    errors: dict[str, int] = {}
    for r in requests:
        if r.get("outcome") not in (None, "ok"):
            errors[r["outcome"]] = errors.get(r["outcome"], 0) + 1
    ok = sum(1 for r in requests if r.get("outcome") == "ok")
    return {"sent": len(requests), "ok": ok, "errors": dict(sorted(errors.items())),
            "lost": len(requests) - ok - sum(errors.values())}


def summarize(requests: list[dict], duration_s: float, unloaded: dict[str, list[float]]) -> dict[str, Any]:
    """The record's figures: counts, throughput, latency and queue percentiles, batch sizes, stall, per shape.

    `unloaded`: per shape, latencies of requests sent one at a time; `unloaded_p50_s` is over all of them.
    `throughput_rps` = ok / (last completion - start): under overload the backlog drains at the engine's rate,
    so it stays the rate the engine sustained; `completed_in_window_rps` counts only completions within the
    sending window.
    """
    ok = [r for r in requests if r.get("outcome") == "ok"]
    lat = [r["latency_s"] for r in ok]
    end = max((r["done_s"] for r in requests if r.get("done_s") is not None), default=0.0)
    stall, stall_at = max_stall((r["arrival_s"], r["done_s"]) for r in requests if r.get("done_s") is not None)
    all_unloaded = [v for vs in unloaded.values() for v in vs]
    unloaded_p50 = percentile(all_unloaded, 0.5)
    out: dict[str, Any] = {
        "counts": count_outcomes(requests),
        "throughput_rps": _round(len(ok) / end) if end > 0 else 0.0,
        "offered_rps": _round(len(requests) / duration_s),
        "completed_in_window_rps": _round(sum(1 for r in ok if r["done_s"] <= duration_s) / duration_s),
        "makespan_s": _round(end),
        **latency_stats(lat),
        **latency_stats([r["queue_s"] for r in ok if r.get("queue_s") is not None], prefix="queue_"),
        "unloaded_p50_s": _round(unloaded_p50),
        "batch_size_histogram": histogram(r["batch_size"] for r in ok if r.get("batch_size") is not None),
        "max_stall_s": stall, "max_stall_at_s": stall_at,
        "send_lag_max_s": _round(max((r["sent_s"] - r["arrival_s"] for r in requests if "sent_s" in r),
                                     default=0.0)),
    }
    out["p99_over_unloaded"] = _ratio(out["p99_s"], unloaded_p50)
    shapes = sorted({r["shape"] for r in requests} | set(unloaded), key=lambda label: (_pixels(label), label))
    out["per_shape"] = {s: shape_stats([r for r in requests if r["shape"] == s], unloaded.get(s, []))
                        for s in shapes}
    return out


def shape_stats(requests: list[dict], unloaded: list[float]) -> dict[str, Any]:
    ok = [r["latency_s"] for r in requests if r.get("outcome") == "ok"]
    base = percentile(unloaded, 0.5)
    stats = {"sent": len(requests), "ok": len(ok), **latency_stats(ok), "unloaded_p50_s": _round(base)}
    stats["p99_over_unloaded"] = _ratio(stats["p99_s"], base)
    return stats


def _pixels(label: str) -> int:
    try:
        w, h = (int(v) for v in label.split("x"))
    except ValueError:
        return 0
    return w * h


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _round(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(v, nd)
