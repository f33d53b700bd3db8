"""Requests that queue while the GPU is busy ride one run, even when they arrived in separate batch windows.

Ray Serve forms a batch when batch_wait_timeout_s expires, whether or not the previous batch still holds the
GPU; the model server coalesces the formed batches at its GPU gate (serving/model_server.py, FORMED_BATCHES).
"""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def coalesce_url(serve_url):
    from ray import serve

    from serving.builder import build_app
    from serving.config import ServingConfig

    cfg = {"app_name": "coalesce", "route_prefix": "/coalesce",
           "models": [{"engine": {"name": "tiny-sd", "device": "cpu", "limits": {"max_steps": 400}},
                       # no batch window at all: without the gate every request would run alone
                       "deployment": {"num_gpus": 0, "num_cpus": 0.5, "max_batch_size": 8,
                                      "batch_wait_timeout_s": 0.0}}]}
    serve.run(build_app(ServingConfig.model_validate(cfg)), name="coalesce", route_prefix="/coalesce")
    yield f"{serve_url}/coalesce"
    try:
        serve.delete("coalesce")
    except Exception:  # noqa: BLE001 - Serve is already down when this was the directory's last test
        pass


async def _fire(url: str):
    """A long run occupies the engine (it has taken its first step: an event, not a guess); then five requests
    arrive one by one, 50 ms apart, each in its own batch window. Returns (their responses, the long run's result)."""
    from ray import serve

    from core.schemas import GenerationRequest

    handle = serve.get_deployment_handle("model-tiny-sd", app_name="coalesce").options(stream=True)
    slow = handle.generate_stream.remote(GenerationRequest(prompt="slow", seed=1, steps=300))
    first = await slow.__anext__()
    assert first["event"] == "progress", first  # the GPU is busy with the slow run now
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        later = []
        for i in range(5):
            later.append(asyncio.ensure_future(
                c.post("/v1/generate", json={"prompt": f"later {i}", "seed": 10 + i, "steps": 8})))
            await asyncio.sleep(0.05)  # the arrival pattern under test, not a wait for something to happen
        responses = list(await asyncio.gather(*later))
    outcome = None
    async for event in slow:
        outcome = event.get("outcome", outcome)
    return responses, outcome


def test_requests_queued_behind_a_busy_gpu_share_one_run(coalesce_url):
    t0 = time.perf_counter()
    later, slow = asyncio.run(_fire(coalesce_url))
    assert slow is not None and slow.batch_size == 1, slow
    assert [r.status_code for r in later] == [200] * 5, [r.text for r in later]
    sizes = [int(r.headers["x-batch-size"]) for r in later]
    assert sizes == [5] * 5, f"expected one coalesced run of 5, got batch sizes {sizes}"
    assert time.perf_counter() - t0 < 120


def test_coalesced_images_equal_the_same_requests_alone(coalesce_url):
    """Riding a coalesced run changes nothing in the bytes (per-sample seeds)."""
    later, _ = asyncio.run(_fire(coalesce_url))
    with httpx.Client(base_url=coalesce_url, timeout=120) as c:
        alone = c.post("/v1/generate", json={"prompt": "later 3", "seed": 13, "steps": 8})
    assert alone.status_code == 200
    assert alone.content == later[3].content
