"""Abandoned work stops at the next step on real Serve (issue 24 item 1): a request that hits the ingress's
request_timeout_s (504) and a client that disconnects mid-generation are cancelled in the model replica's engine
(scheduling.cancelled_requests), leave no images in flight, and cost a request sharing their batch nothing.

The app "abandon" (/abandon) has a 3 s request timeout; its long requests (256x256, 1000 steps: ~25 s on this
CPU) would hold the replica far longer than the deadlines below if they kept running.
"""
from __future__ import annotations

import io
import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from core.schemas import GenerationRequest, GenerationResult

pytestmark = pytest.mark.integration

KEY = "abandon-key"
TIMEOUT_S = 3.0
LONG = {"prompt": "abandoned", "width": 256, "height": 256, "steps": 1000}
FREED_WITHIN_S = 15.0  # well under the ~25 s the long request would still run


@pytest.fixture(scope="module")
def abandon_url(serve_url):
    from ray import serve

    from serving.builder import build_app
    from serving.config import ServingConfig

    cfg = {"app_name": "abandon", "route_prefix": "/abandon", "security": {"api_keys": [KEY]},
           "ingress": {"request_timeout_s": TIMEOUT_S},
           "models": [{"engine": {"name": "tiny-sd", "device": "cpu",
                                  "limits": {"max_steps": 1000, "max_batch_size": 4}},
                       "deployment": {"num_gpus": 0, "num_cpus": 0.5}}]}
    serve.run(build_app(ServingConfig.model_validate(cfg)), name="abandon", route_prefix="/abandon")
    return f"{serve_url}/abandon"  # (Ray, and every app, stop after this directory's last test: conftest.py)


@pytest.fixture(scope="module")
def model(abandon_url):
    from ray import serve

    return serve.get_deployment_handle("model-tiny-sd", app_name="abandon")


def scheduling(model) -> dict:
    return model.info.remote().result()["scheduling"]


def wait_for(model, condition, within_s: float, what: str) -> dict:
    """Poll the replica's engine counters until `condition(scheduling)` holds (the event), or fail at the deadline."""
    deadline = time.monotonic() + within_s
    while True:
        state = scheduling(model)
        if condition(state):
            return state
        assert time.monotonic() < deadline, f"{what}: not within {within_s}s: {state}"
        time.sleep(0.05)  # poll interval; the loop waits for the condition itself


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def small_request_is_served(url: str) -> None:
    r = httpx.post(f"{url}/v1/generate", json={"prompt": "next", "steps": 2, "width": 64, "height": 64},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text


def test_a_timed_out_request_is_cancelled_and_costs_its_batch_nothing(abandon_url, model):
    companion = GenerationRequest(prompt="companion", width=256, height=256, steps=250, seed=7)
    before = scheduling(model)
    assert before["active_images"] == 0
    answer: dict = {}

    def post_long() -> None:
        answer["response"] = httpx.post(f"{abandon_url}/v1/generate", json={**LONG, "seed": 1}, timeout=120,
                                        headers={"Authorization": f"Bearer {KEY}"})

    long_request = threading.Thread(target=post_long)
    long_request.start()
    # the long request is denoising, then the companion joins its batch (same shape: the same UNet calls)
    wait_for(model, lambda s: s["active_images"] >= 1, 60, "long request admitted")
    shared = model.generate.remote(companion)
    long_request.join(60)
    r = answer["response"]
    assert r.status_code == 504 and r.json()["detail"]["code"] == "timeout", r.text
    # cancelled in the engine at its next step: only the companion's image stays in flight
    freed = wait_for(model, lambda s: s["cancelled_requests"] == before["cancelled_requests"] + 1
                     and s["active_images"] <= 1, FREED_WITHIN_S, "timed-out request cancelled")
    result = shared.result(timeout_s=120)
    assert isinstance(result, GenerationResult) and result.batch_size >= 2, result  # it did share the batch
    wait_for(model, lambda s: s["active_images"] == 0 and s["waiting_requests"] == 0, 30, "replica idle")
    small_request_is_served(abandon_url)
    alone = model.generate.remote(companion).result(timeout_s=120)
    assert alone.batch_size == 1
    diff = np.abs(pixels(result.images[0].data) - pixels(alone.images[0].data)).max()
    assert diff <= 2, diff  # equal to running it alone within 2/255
    assert scheduling(model)["cancelled_requests"] == freed["cancelled_requests"]  # nothing else was cancelled


def test_a_client_that_disconnects_mid_generation_frees_the_replica_at_the_next_step(abandon_url, model):
    before = wait_for(model, lambda s: s["active_images"] == 0, 60, "replica idle")
    url = urlparse(abandon_url)
    body = json.dumps({**LONG, "seed": 2}).encode()
    head = (f"POST {url.path}/v1/generate HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    conn = socket.create_connection((url.hostname, url.port), timeout=30)
    try:
        conn.sendall(head + body)
        running = wait_for(model, lambda s: s["active_images"] >= 1, 60, "long request denoising")
        calls_at_disconnect = running["unet_calls"]
    finally:
        conn.close()  # the client goes away mid-generation
    after = wait_for(model, lambda s: s["cancelled_requests"] == before["cancelled_requests"] + 1
                     and s["active_images"] == 0, FREED_WITHIN_S, "disconnected request cancelled")
    assert after["unet_calls"] - calls_at_disconnect < LONG["steps"] // 2  # stopped, not run to its end
    assert after["unet_calls"] == scheduling(model)["unet_calls"]  # and nothing keeps running for it
    small_request_is_served(abandon_url)
