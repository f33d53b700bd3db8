"""Issue #3: after a CUDA error the replica's check_health fails, and Serve really replaces the replica.

The fault is injected into the replica's worker process through the deployment's runtime_env, the deployment
option the builder passes through: env_vars PYTHONPATH puts fault_site/ first, whose sitecustomize.py Python
imports at start-up and which installs fault_injection.py. A prompt with the marker then raises "CUDA error: an
illegal memory access was encountered" from inside the UNet's forward, as a real fault would. Nothing in product
code knows about it. (runtime_env's worker_process_setup_hook would be the obvious tool, but Ray 2.60 runs it only
from the job-level runtime_env of ray.init; in an actor's runtime_env, which is what a deployment has, it is
silently ignored.)
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from tests.serving.fault_injection import CUDA_FAULT, MARKER

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
APP, PREFIX, MODEL = "healthrepl", "/healthrepl", "tiny-fault"
DEPLOYMENT = f"model-{MODEL}"


def fault_config() -> dict:
    return {"app_name": APP, "route_prefix": PREFIX,
            "models": [{"engine": {"name": MODEL, "device": "cpu", "optimization": {"warmup_steps": 1},
                                   "limits": {"max_batch_size": 1}},
                        "deployment": {
                            "num_replicas": 1, "num_gpus": 0, "num_cpus": 0.5,
                            "health_check_period_s": 1, "health_check_timeout_s": 10,
                            "graceful_shutdown_timeout_s": 1,
                            "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(
                                [str(HERE / "fault_site"), str(ROOT), "${PYTHONPATH}"])}}}}]}


def deployment_status() -> str:
    from ray import serve

    app = serve.status().applications.get(APP)
    dep = app.deployments.get(DEPLOYMENT) if app else None
    return str(getattr(dep.status, "value", dep.status)) if dep else "MISSING"


def replica_actor_alive(replica_id: str) -> bool:
    import ray

    try:
        ray.get_actor(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#{replica_id}", namespace="serve")
    except ValueError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="module")
def fault_app(serve_url):
    from ray import serve

    from serving.builder import build_app
    from serving.config import ServingConfig

    serve.run(build_app(ServingConfig.model_validate(fault_config())), name=APP, route_prefix=PREFIX)
    yield f"{serve_url}{PREFIX}"
    import ray

    if ray.is_initialized():  # conftest may already have stopped Ray when this is the directory's last test
        serve.delete(APP, _blocking=False)  # (not waiting for the replicas to stop: conftest.py)


def generate(url: str, prompt: str, seed: int) -> httpx.Response:
    # A bounded wait: the faulting request must come back, not hang.
    return httpx.post(f"{url}/v1/generate", json={"prompt": prompt, "seed": seed, "steps": 2}, timeout=60)


def test_cuda_error_fails_health_check_and_serve_replaces_the_replica(fault_app):
    from ray import serve

    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
    ok = generate(fault_app, "a lighthouse", 1)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    before = handle.info.remote().result()
    assert before["name"] == MODEL and deployment_status() == "HEALTHY"
    assert replica_actor_alive(before["replica"]) and pid_alive(before["pid"])

    t0 = time.monotonic()
    bad = generate(fault_app, f"a lighthouse {MARKER}", 2)
    assert bad.status_code == 500, (
        f"got {bad.status_code}: the fault was not injected (see the replica's worker .err log for "
        "'Error in sitecustomize')" if bad.status_code == 200 else bad.text)
    detail = bad.json()["detail"]
    assert detail["code"] == "internal_error" and CUDA_FAULT in detail["message"]
    assert time.monotonic() - t0 < 30

    # Serve health-checks every 1 s and replaces a replica after 3 failed checks in a row.
    deadline = time.monotonic() + 90
    after, seen = None, set()
    while time.monotonic() < deadline:
        seen.add(deployment_status())
        try:
            info = handle.info.remote().result(timeout_s=10)
        except Exception:  # noqa: BLE001 - the old replica may be going away under the call
            info = None
        if info and info["replica"] != before["replica"] and deployment_status() == "HEALTHY":
            after = info
            break
        time.sleep(0.5)
    assert after is not None, f"the broken replica was not replaced within 90 s (statuses seen: {seen})"
    replaced_s = time.monotonic() - t0
    assert after["pid"] != before["pid"]

    # The old replica is gone: its actor is dead and its worker process has exited.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (replica_actor_alive(before["replica"]) or pid_alive(before["pid"])):
        time.sleep(0.2)
    assert not replica_actor_alive(before["replica"])
    assert not pid_alive(before["pid"])

    again = generate(fault_app, "a lighthouse", 1)
    assert again.status_code == 200 and again.content == ok.content  # same seed, same bytes, new replica
    assert handle.info.remote().result()["replica"] == after["replica"]  # the only replica serves it
    assert deployment_status() == "HEALTHY"
    print(f"replica {before['replica']} (pid {before['pid']}) replaced by {after['replica']} (pid {after['pid']}) "
          f"{replaced_s:.1f} s after the fault")
