"""HTTP load generator for the serving app, with the engine's offline throughput as the baseline.

The offline baseline runs first (before the app takes the GPU): the same requests through `Engine.generate`
in batches of the engine's limits.max_batch_size. The report's `serving_efficiency` is HTTP throughput at saturation
divided by offline throughput; `added_latency_ms` is unloaded HTTP p50 minus the offline single-request time.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from core.config import EngineConfig
from serving.config import ModelConfig, ServingConfig


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def bench_bodies(body: dict[str, Any], n: int, offset: int = 0) -> list[dict[str, Any]]:
    return [{"prompt": f"benchmark image {offset + i}", "seed": offset + i, **body} for i in range(n)]


def local_engine_config(model: ModelConfig) -> EngineConfig:
    """The engine config a replica of `model` would load, for an engine in this process (the whole local GPU
    when there is one): what offline baselines and in-process benchmarks run."""
    from serving.builder import replica_engine_config, resolve_num_gpus

    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    return replica_engine_config(model, resolve_num_gpus(model, has_gpu))


def offline_baseline(config: ServingConfig, body: dict[str, Any], n: int) -> dict[str, Any]:
    from core.engine import Engine
    from core.schemas import GenerationRequest

    model = config.models[0]
    engine = Engine(local_engine_config(model)).load()
    reqs = [GenerationRequest(**b) for b in bench_bodies(body, n, offset=10_000)]
    batch = model.engine.limits.max_batch_size
    engine.generate(reqs[:1])  # untimed: first calls at a shape pay one-off kernel selection
    engine.generate(reqs[:batch])
    singles = []
    for req in reqs[:5]:
        t0 = time.perf_counter()
        engine.generate([req])
        singles.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for start in range(0, len(reqs), batch):
        engine.generate(reqs[start:start + batch])
    wall = time.perf_counter() - t0
    out = {"requests": n, "batch_size": batch, "throughput_rps": n / wall, "single_latency_s": statistics.median(
        singles), "single_latency_spread_s": max(singles) - min(singles), "device": engine.info()["device"]}
    del engine
    return out


async def _load_level(url: str, bodies: list[dict], concurrency: int, headers: dict[str, str]) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    batch_sizes: dict[str, int] = {}  # X-Batch-Size: the GPU run each request rode in
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def worker(client: httpx.AsyncClient):
        while True:
            try:
                b = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/generate", json=b, headers=headers)
                code = str(r.status_code)
                size = r.headers.get("x-batch-size")
                if size:
                    batch_sizes[size] = batch_sizes.get(size, 0) + 1
            except httpx.HTTPError as err:
                code = type(err).__name__
            statuses[code] = statuses.get(code, 0) + 1
            if code == "200":
                latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = len(latencies)
    return {"concurrency": concurrency, "requests": len(bodies), "ok": ok, "statuses": statuses,
            "batch_sizes": dict(sorted(batch_sizes.items(), key=lambda kv: int(kv[0]))),
            "throughput_rps": ok / wall if wall else 0.0, "p50_s": percentile(latencies, 0.5),
            "p95_s": percentile(latencies, 0.95), "p99_s": percentile(latencies, 0.99),
            "mean_s": statistics.fmean(latencies) if latencies else None}


def run_bench(config: ServingConfig, url: str | None, concurrency: list[int], requests_per_level: int,
              body: dict[str, Any], api_key: str | None = None, port: int = 8011,
              offline: bool = True) -> dict[str, Any]:
    body = {"model": config.default_model, **body}
    report: dict[str, Any] = {"model": body["model"], "body": body, "levels": []}
    if offline:
        report["offline"] = offline_baseline(config, {k: v for k, v in body.items()}, requests_per_level)
    started = False
    if url is None:
        import ray
        from ray import serve

        from serving.builder import build_app

        ray.init(include_dashboard=False, ignore_reinit_error=True)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
        url, started = f"http://127.0.0.1:{port}{config.route_prefix.rstrip('/')}", True
    headers = {"Accept": "image/*"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        asyncio.run(_load_level(url, bench_bodies(body, 4, offset=20_000), 2, headers))  # warm-up, not reported
        for i, c in enumerate(concurrency):
            bodies = bench_bodies(body, requests_per_level, offset=100_000 * (i + 1))
            report["levels"].append(asyncio.run(_load_level(url, bodies, c, headers)))
    finally:
        if started:
            from ray import serve

            serve.shutdown()
    best = max((lv["throughput_rps"] for lv in report["levels"]), default=0.0)
    report["http_throughput_at_saturation_rps"] = best
    if offline and report["offline"]["throughput_rps"]:
        report["serving_efficiency"] = best / report["offline"]["throughput_rps"]
        unloaded = next((lv for lv in report["levels"] if lv["concurrency"] == 1 and lv["p50_s"]), None)
        if unloaded:
            report.update(added_latency(unloaded["p50_s"], report["offline"]["single_latency_s"],
                                        report["offline"]["single_latency_spread_s"]))
    return report


def added_latency(http_p50_s: float, offline_s: float, offline_spread_s: float) -> dict[str, Any]:
    """HTTP p50 minus the offline single-request time, or None with the reason when that difference is inside
    the baseline's own noise (on CPU a tiny model's run-to-run spread dwarfs the serving overhead, and the
    difference even comes out negative)."""
    added = http_p50_s - offline_s
    if added < 0 or added <= offline_spread_s:
        return {"added_latency_ms": None,
                "added_latency_note": f"not meaningful: HTTP p50 - offline = {added * 1000:.1f} ms is within the "
                                      f"offline baseline's spread ({offline_spread_s * 1000:.1f} ms over 5 runs)"}
    return {"added_latency_ms": added * 1000}
