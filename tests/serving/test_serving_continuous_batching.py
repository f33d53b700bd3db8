"""Concurrent handle calls share UNet calls: the engine's step scheduler is the only batching layer.

Requests that arrive while another one is denoising join its batch at the next step (continuous batching) and
leave when they are done; no @serve.batch window, no GPU gate (issue 18).
"""
from __future__ import annotations

import io
import time

import numpy as np
import pytest

from core.schemas import GenerationRequest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def handle(serve_url):
    from ray import serve

    from serving.builder import build_app
    from serving.config import ServingConfig

    cfg = {"app_name": "continuous", "route_prefix": "/continuous",
           "models": [{"engine": {"name": "tiny-sd", "device": "cpu", "limits": {"max_steps": 400}},
                       "deployment": {"num_gpus": 0, "num_cpus": 0.5}}]}
    serve.run(build_app(ServingConfig.model_validate(cfg)), name="continuous", route_prefix="/continuous")
    yield serve.get_deployment_handle("model-tiny-sd", app_name="continuous")
    try:
        serve.delete("continuous", _blocking=False)  # (not waiting for the replicas to stop: conftest.py)
    except Exception:  # noqa: BLE001 - Serve is already down when this was the directory's last test
        pass


def _pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).astype(np.int16)


def _fire(handle):
    """A long request occupies the engine; five short ones arrive one by one, 50 ms apart, while it runs."""
    slow = handle.generate.remote(GenerationRequest(prompt="slow", seed=1, steps=300))
    time.sleep(0.5)
    later = []
    for i in range(5):
        later.append(handle.generate.remote(GenerationRequest(prompt=f"later {i}", seed=10 + i, steps=8)))
        time.sleep(0.05)
    return [r.result(timeout_s=300) for r in later], slow.result(timeout_s=300)


def test_concurrent_handle_calls_share_unet_calls_and_join_a_running_batch(handle):
    before = handle.info.remote().result()["scheduling"]
    later, slow = _fire(handle)
    after = handle.info.remote().result()["scheduling"]
    # The short ones joined the long one's batch: nobody ran alone, although they arrived at different times.
    assert slow.batch_size >= 2 and all(r.batch_size >= 2 for r in later), \
        (slow.batch_size, [r.batch_size for r in later])
    assert max(r.batch_size for r in later) >= 3
    new = {int(k): v - before["batch_size_histogram"].get(k, 0) for k, v in after["batch_size_histogram"].items()}
    assert sum(v for k, v in new.items() if k > 1) >= 8  # at least the short ones' 8 steps were shared
    assert after["unet_calls"] - before["unet_calls"] < 300 + 5 * 8  # shared calls, not one per request-step


def test_joined_images_equal_the_same_requests_alone(handle):
    """Joining a running batch changes nothing but float rounding of batched CPU matmuls (<= 2/255)."""
    later, _ = _fire(handle)
    alone = handle.generate.remote(GenerationRequest(prompt="later 3", seed=13, steps=8)).result(timeout_s=300)
    assert alone.batch_size == 1
    assert np.abs(_pixels(alone.images[0].data) - _pixels(later[3].images[0].data)).max() <= 2
