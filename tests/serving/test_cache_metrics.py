"""The engine's cache counters become Prometheus counter increments (serving/metrics.py cache_deltas)."""
from __future__ import annotations

from serving.metrics import cache_deltas


def test_cache_counters_export_only_their_increase():
    seen: dict = {}
    stats = {"prompt_embeddings": {"hits": 2, "misses": 1}, "init_latents": {"hits": 0, "misses": 0}}
    assert cache_deltas(seen, stats) == {("prompt_embeddings", "hits"): 2, ("prompt_embeddings", "misses"): 1}
    stats["prompt_embeddings"]["hits"] = 5
    stats["init_latents"]["misses"] = 1
    assert cache_deltas(seen, stats) == {("prompt_embeddings", "hits"): 3, ("init_latents", "misses"): 1}
    assert cache_deltas(seen, stats) == {}
