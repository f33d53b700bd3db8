"""Ray Serve custom metrics of the model replicas (exported with Serve's own metrics, Prometheus format).

Names are prefixed `sdserve_` here; Ray exports custom metrics with its own `ray_` prefix, so Prometheus sees
`ray_sdserve_*` on each node's metrics export port. Every metric is tagged with the model. Created lazily inside a replica (the
metric objects need a running Ray worker).
"""
from __future__ import annotations

from core.schemas import GenerationResult

STAGES = ("queue", "denoise", "decode", "encode", "total")
LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
GiB = 1024**3
# One description for the counter that model replicas and the ingress both export.
ERRORS_DESCRIPTION = ("Failed requests by kind: validation, capacity, oom, cancelled, internal (model replicas); "
                      "overloaded, unavailable, queue_full, draining, jobs_store_unavailable, timeout, cancelled "
                      "(ingress: 503s, 504s, cancelled jobs).")


def compiled_graphs() -> int:
    """Dynamo's count of compiled graphs in this process (0 when torch.compile was never used: not imported)."""
    import sys

    utils = sys.modules.get("torch._dynamo.utils")
    return int(utils.counters["stats"]["unique_graphs"]) if utils is not None else 0


class ModelMetrics:
    def __init__(self, model: str):
        from ray.serve import metrics

        self.model = model
        tags = ("model",)
        self.latency = metrics.Histogram("sdserve_stage_latency_s", description="Latency per request by stage "
                                         "(queue, denoise, decode, encode, total).",
                                         boundaries=LATENCY_BOUNDARIES_S, tag_keys=("model", "stage"))
        self.batch = metrics.Histogram("sdserve_batch_images", description="Images per UNet call (the "
                                       "engine's step-level batches).", boundaries=BATCH_BOUNDARIES, tag_keys=tags)
        self.queue = metrics.Gauge("sdserve_queue_length", description="Requests waiting in this replica for a "
                                   "batch.", tag_keys=tags)
        self.vram = metrics.Gauge("sdserve_peak_vram_bytes", description="Peak CUDA memory of the last call "
                                  "(0 on a CPU replica).", tag_keys=tags)
        self.compiled = metrics.Gauge("sdserve_compiled_graphs", description="Graphs torch.compile (Dynamo) has "
                                      "compiled in this replica so far; a rise after warm-up is a recompile.",
                                      tag_keys=tags)
        self.errors = metrics.Counter("sdserve_errors_total", description=ERRORS_DESCRIPTION,
                                      tag_keys=("model", "kind"))
        self.images = metrics.Counter("sdserve_images_total", description="Images generated.", tag_keys=tags)
        cache_tags = ("model", "cache")
        self.cache_hits = metrics.Counter("sdserve_cache_hits_total", description="Engine cache hits by cache: "
                                          "prompt_embeddings, init_latents, control_maps.", tag_keys=cache_tags)
        self.cache_misses = metrics.Counter("sdserve_cache_misses_total", description="Engine cache misses by "
                                            "cache: prompt_embeddings, init_latents, control_maps.",
                                            tag_keys=cache_tags)
        self._cache_seen: dict = {}
        for m in (self.batch, self.queue, self.vram, self.compiled, self.images):
            m.set_default_tags({"model": model})

    def observe_result(self, result: GenerationResult) -> None:
        t = result.timings
        for stage, value in (("queue", t.queue_s), ("denoise", t.denoise_s), ("decode", t.decode_s),
                             ("encode", t.encode_s), ("total", t.total_s)):
            self.latency.observe(value, tags={"model": self.model, "stage": stage})
        self.images.inc(len(result.images))
        self.vram.set(result.peak_vram_bytes or 0)  # None: no CUDA in this replica
        self.compiled.set(compiled_graphs())

    def observe_error(self, kind: str) -> None:
        self.errors.inc(tags={"model": self.model, "kind": str(kind)})

    def observe_caches(self, stats: dict) -> None:
        """Export the engine's cache counters (Engine.info()["caches"], i.e. engine.caches.stats()): the
        hits/misses since the last call."""
        for (cache, what), delta in cache_deltas(self._cache_seen, stats).items():
            counter = self.cache_hits if what == "hits" else self.cache_misses
            counter.inc(delta, tags={"model": self.model, "cache": cache})


def cache_deltas(seen: dict, stats: dict) -> dict:
    """{(cache, "hits"|"misses"): increase} since `seen` (updated in place) for monotonic engine counters."""
    out = {}
    for cache, counts in stats.items():
        for what in ("hits", "misses"):
            now = int(counts.get(what, 0))
            delta = now - seen.get((cache, what), 0)
            seen[(cache, what)] = now
            if delta > 0:
                out[(cache, what)] = delta
    return out


class IngressMetrics:
    """The ingress's share of `sdserve_errors_total`: what never reaches a model replica or ends outside one.

    kind: the API error code of 503s (overloaded, unavailable, queue_full, draining, jobs_store_unavailable,
    oom) and 504s (timeout), and `cancelled` for cancelled jobs and abandoned requests. Same metric name and tag
    keys as the replicas' (ModelMetrics.errors), so one PromQL sum covers both; model is '-' when none applies.
    """

    def __init__(self):
        from ray.serve import metrics

        self.errors = metrics.Counter("sdserve_errors_total", description=ERRORS_DESCRIPTION,
                                      tag_keys=("model", "kind"))

    def observe_error(self, kind: str, model: str | None = None) -> None:
        self.errors.inc(tags={"model": model or "-", "kind": kind})


_ingress_metrics: IngressMetrics | None = None


def ingress_metrics() -> IngressMetrics | None:
    """The process's IngressMetrics, or None outside a Ray worker (metrics need one)."""
    global _ingress_metrics
    if _ingress_metrics is None:
        try:
            _ingress_metrics = IngressMetrics()
        except Exception:  # noqa: BLE001 - no Ray worker here (unit tests): nothing to export to
            return None
    return _ingress_metrics


def count_error(kind: str, model: str | None = None) -> None:
    metrics = ingress_metrics()
    if metrics is not None:
        metrics.observe_error(kind, model)
