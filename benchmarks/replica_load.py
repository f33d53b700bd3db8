"""The load side of the replica proof (benchmarks/replica_proof.py): a seeded plan of mixed-size requests, the
concurrent HTTP load that sends it, and what became of each request.

Stdlib-only at import (httpx is imported when the load runs): `sdserve bench replicas --help` stays cheap.
"""
from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from typing import Any

# (width factor, height factor) of the model's default side, with a weight. "max": the largest square the
# model's limits accept. Both the big ones and "max" are meant to probe the VRAM budget.
SIZE_MIX: list[tuple[Any, float]] = [((0.75, 0.75), 3), ((1, 1), 6), ((1, 1.5), 2), ((1.5, 1), 2), ((1.5, 1.5), 2),
                                     ((2, 2), 1.5), ((2.5, 2.5), 1), ((3, 3), 1), ("max", 1.5)]
CLEAN_CAPACITY = "VRAM budget"  # the engine's capacity rejection says "... this replica's VRAM budget is ..."
# Every outcome `classify` gives, and those that fail the proof (the report counts all of them, zeros included).
OUTCOMES = ("ok", "capacity", "backpressure", "oom", "error_5xx", "error_4xx", "transport")
FAILED_OUTCOMES = ("oom", "error_5xx", "error_4xx", "transport")


# ---------------------------------------------------------------------------------------------- request plan
def default_side(model) -> int:
    """The model's default image side (what the engine uses when a request names no size)."""
    from core.engine import FAMILY_DEFAULTS, TINY_DEFAULTS

    eng = model.engine
    if eng.defaults.width:
        return eng.defaults.width
    if eng.embedded_name in ("tiny-sd", "tiny-sdxl"):
        return TINY_DEFAULTS[0]
    family = eng.family if eng.family != "auto" else ("sdxl" if "xl" in eng.source.lower() else "sd15")
    return FAMILY_DEFAULTS[family][0]


def size_menu(model) -> list[tuple[int, int, float]]:
    """(width, height, weight): multiples of 64 within the model's limits."""
    lim, side = model.engine.limits, default_side(model)

    def fit(px: float, cap: int) -> int:
        return max(64, min(cap // 64 * 64, int(round(px / 64)) * 64))

    out: dict[tuple[int, int], float] = {}
    for factor, weight in SIZE_MIX:
        if factor == "max":
            s = min(lim.max_width, lim.max_height, math.isqrt(lim.max_pixels)) // 64 * 64
            w = h = max(64, s)
        else:
            w, h = fit(side * factor[0], lim.max_width), fit(side * factor[1], lim.max_height)
        if w * h > lim.max_pixels:
            continue
        out[(w, h)] = out.get((w, h), 0) + weight
    return [(w, h, wt) for (w, h), wt in out.items()]


def request_plan(models: list, n: int, seed: int, steps: list[int], output_format: str = "jpeg") -> list[dict]:
    """n request bodies, models in turn, everything else drawn from a Random(seed): same seed, same plan."""
    rng = random.Random(seed)
    menus = {m.name: size_menu(m) for m in models}
    plan = []
    for i in range(n):
        m = models[i % len(models)]
        menu = menus[m.name]
        w, h, _ = rng.choices(menu, weights=[x[2] for x in menu])[0]
        lim = m.engine.limits
        plan.append({"model": m.name, "prompt": f"replica proof {i}", "seed": rng.randrange(2**31),
                     "width": w, "height": h, "num_images": rng.randint(1, lim.max_images_per_request),
                     "steps": min(rng.choice(steps), lim.max_steps), "output_format": output_format})
    return plan


# ---------------------------------------------------------------------------------------------- outcomes
def classify(status: int | str, body: Any) -> tuple[str, str | None, str]:
    """(outcome, code, message): one of OUTCOMES, the error code, the error message."""
    if isinstance(status, str):
        return "transport", status, ""
    if status == 200:
        return "ok", None, ""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # native 422: [{"loc": [...], "msg": ..., "type": ...}]
        msg = "; ".join(str(d.get("msg", "")) for d in detail if isinstance(d, dict))
        code = None
    elif isinstance(detail, dict):
        msg, code = str(detail.get("message", "")), detail.get("code")
    else:
        msg, code = str(detail if detail is not None else body)[:500], None
    low = msg.lower()
    if code == "oom" or any(t in low for t in ("out of memory", "out of gpu memory", "outofmemoryerror")):
        return "oom", code or "oom", msg
    if status == 503 and code == "overloaded":
        return "backpressure", code, msg
    if status >= 500:
        return "error_5xx", code, msg
    if status == 422 and CLEAN_CAPACITY in msg:
        return "capacity", "capacity", msg
    return "error_4xx", code, msg


def size_label(record: dict) -> str:
    """The size of a request record as the report names sizes: WIDTHxHEIGHT."""
    return f"{record['width']}x{record['height']}"


async def run_load(url: str, plan: list[dict], concurrency: int, duration_s: float | None, headers: dict,
                   timeout_s: float, progress_every: int = 20) -> tuple[list[dict], float]:
    """Send `plan` to {url}/v1/generate from `concurrency` workers; (one record a request sent, wall seconds)."""
    import httpx

    records: list[dict] = []
    queue: asyncio.Queue = asyncio.Queue()
    for i, body in enumerate(plan):
        queue.put_nowait((i, body))
    t_start = time.perf_counter()

    async def worker(client: httpx.AsyncClient):
        while True:
            if duration_s is not None and time.perf_counter() - t_start > duration_s:
                return
            try:
                i, body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            data: Any = None
            try:
                r = await client.post(f"{url}/v1/generate", json=body, headers=headers)
                status: int | str = r.status_code
                try:
                    data = r.json()
                except ValueError:
                    data = r.text[:500]
            except httpx.HTTPError as err:
                status, data = type(err).__name__, None
            outcome, code, msg = classify(status, data)
            rec = {"i": i, "model": body["model"], "width": body["width"], "height": body["height"],
                   "num_images": body["num_images"], "steps": body["steps"], "status": status, "outcome": outcome,
                   "latency_s": round(time.perf_counter() - t0, 3)}
            if outcome == "ok" and isinstance(data, dict):
                rec.update(batch_size=data.get("batch_size"), peak_vram_bytes=data.get("peak_vram_bytes"),
                           images=len(data.get("images", [])))
            else:
                rec.update(code=code, message=msg[:400])
            records.append(rec)
            if len(records) % progress_every == 0:
                print(f"replica proof: {len(records)}/{len(plan)} done, {time.perf_counter() - t_start:.0f}s",
                      file=sys.stderr, flush=True)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return sorted(records, key=lambda r: r["i"]), time.perf_counter() - t_start


# ---------------------------------------------------------------------------------------------- summaries
def summarize(records: list[dict], models: list[str]) -> dict[str, Any]:
    """Per model: counts by status and outcome, the sizes served and rejected, peak VRAM, latency."""
    by_model: dict[str, Any] = {}
    for name in models:
        recs = [r for r in records if r["model"] == name]
        outcomes: dict[str, int] = {}
        statuses: dict[str, int] = {}
        for r in recs:
            outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        ok = [r for r in recs if r["outcome"] == "ok"]
        peaks = [r["peak_vram_bytes"] for r in ok if r.get("peak_vram_bytes")]
        rejected_sizes = sorted({size_label(r) for r in recs if r["outcome"] == "capacity"})
        by_model[name] = {
            "requests": len(recs), "statuses": statuses, "outcomes": outcomes,
            "images": sum(r.get("images", 0) for r in ok),
            "largest_served": max((size_label(r) for r in ok), key=lambda s: math.prod(
                map(int, s.split("x"))), default=None),
            "rejected_sizes": rejected_sizes,
            "max_batch_size": max((r.get("batch_size") or 0 for r in ok), default=0),
            "peak_vram_allocated_bytes": max(peaks) if peaks else None,
            "latency_s_p50": _pct([r["latency_s"] for r in ok], 0.5),
            "latency_s_max": max((r["latency_s"] for r in ok), default=None)}
    return by_model


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round((len(s) - 1) * q)))]


def outcome_totals(records: list[dict]) -> dict[str, int]:
    """How many requests had each outcome, every outcome named (zeros too)."""
    outcomes = [r["outcome"] for r in records]
    return {k: outcomes.count(k) for k in OUTCOMES}


def clean_rejections(records: list[dict]) -> list[dict]:
    """The requests refused cleanly for capacity (HTTP 422, the VRAM budget), as the report lists them."""
    return [{"model": r["model"], "size": size_label(r), "num_images": r["num_images"], "status": r["status"],
             "kind": r["code"], "message": r["message"]} for r in records if r["outcome"] == "capacity"]
