"""One local Ray + Serve for all tests/serving modules (starting Ray costs ~10 s): two apps.

Ray gets 3 logical GPUs (no CUDA: Ray only assigns ids and sets CUDA_VISIBLE_DEVICES; engines run on CPU):
- "sdserve" at /: two tiny models at 0.5 logical GPU each (engines pinned to CPU), API keys on; tiny-b serves a
  tiny ControlNet ("tiny-pose"). Together they fill one logical GPU.
- "strict" at /strict: one model with a 1-deep queue, a rate limit, a small body limit and a blocklist.

A module's own app is deleted with serve.delete(name, _blocking=False) when the module ends: Serve removes its
app and stops its replicas in the background (each one's graceful shutdown waits at least one 2 s wait
loop) while the next module runs; waiting for that cost every such module ~3 s and no test reads it.

Ray is shut down as soon as the last test of this directory ran (pytest has no per-directory scope for
folders without __init__.py), so other packages' tests can start their own Ray.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.free_ports import free_port

HERE = Path(__file__).parent
KEYS = ["test-key-alpha", "test-key-beta"]
STRICT_KEYS = ["strict-rl", "strict-bp", "strict-misc"]
_cleanups: list = []


def main_config() -> dict:
    dep = {"num_gpus": 0.5, "num_cpus": 0.5}
    # Many tests send wrong keys from 127.0.0.1 on purpose: the failed-auth throttle (tested on its own app) is
    # set high here.
    return {"app_name": "sdserve", "route_prefix": "/",
            "security": {"api_keys": KEYS, "auth_failures": {"max_failures": 1000}},
            "jobs": {"backend": "local", "concurrency": 2, "max_retries": 3, "lease_s": 3, "max_queued": 30,
                     "max_unfinished_per_key": 24},
            "models": [{"engine": {"name": "tiny-sd", "device": "cpu", "limits": {"max_steps": 400}}, "deployment": dep},
                       {"engine": {"name": "tiny-b", "device": "cpu", "seed": 1, "limits": {"max_steps": 400},
                                   # a tiny random-weight ControlNet (issue 19's routes)
                                   "controlnets": [{"name": "tiny-pose", "source": "embedded:tiny-sd-controlnet"}]},
                        "deployment": dep}]}


def strict_config() -> dict:
    return {"app_name": "strict", "route_prefix": "/strict",
            "security": {"api_keys": STRICT_KEYS, "rate_limit": {"requests_per_minute": 30, "burst": 10},
                         "max_body_bytes": 2048, "prompt_blocklist": ["forbidden thing"]},
            "image_inputs": {"max_body_bytes": 4096},  # the routes that take images
            "models": [{"engine": {"name": "tiny-sd", "device": "cpu",
                                   "limits": {"max_steps": 400, "max_batch_size": 1}},
                        "deployment": {"num_gpus": 0, "num_cpus": 0.5,
                                       "max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 3}}]}


@pytest.fixture(scope="session")
def ray_cluster(sdserve_cache_dir):
    import ray

    if ray.is_initialized():  # someone else's cluster may lack the logical GPUs the placement tests need
        ray.shutdown()
    # 3 logical GPUs: the main app's 0.5 + 0.5, and one whole GPU for each of the LoRA app's two replicas
    # (test_serving_loras.py; that module deletes its app when it ends).
    # Metrics are exported every 2 s instead of Ray's default 10 s: the tests that read this node's Prometheus
    # export (test_grafana_dashboard, test_serving_ops) wait for the first export that carries their samples.
    ray.init(num_cpus=8, num_gpus=3, include_dashboard=False, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 2000})

    def stop():
        from ray.serve import context as serve_context

        # No graceful serve.shutdown() first: nothing here tests it (test_drain / test_newcomer_docs do, on their
        # own servers), and stopping every app's replicas one wait loop at a time takes seconds. ray.shutdown()
        # ends this cluster's processes, Serve's with them; the Serve client of the dead cluster is dropped.
        try:
            ray.shutdown()
        finally:
            serve_context._set_global_client(None)
    _cleanups.append(stop)
    yield ray


@pytest.fixture(scope="session")
def serve_url(ray_cluster):
    from ray import serve

    from serving.builder import build_app
    from serving.config import ServingConfig

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ServingConfig.model_validate(main_config())), name="sdserve", route_prefix="/")
    serve.run(build_app(ServingConfig.model_validate(strict_config())), name="strict", route_prefix="/strict")
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def client(serve_url):
    import httpx

    with httpx.Client(base_url=serve_url, timeout=120,
                      headers={"Authorization": f"Bearer {KEYS[0]}"}) as c:
        yield c


@pytest.hookimpl(trylast=True)  # after the item's fixture finalizers: their serve.delete() needs the live cluster
def pytest_runtest_teardown(item, nextitem):
    # (Before them, a module fixture's serve.delete() found Ray shut down and its reconnect started a stray local
    # Ray, dashboard and all, that lived through the rest of the suite.)
    if nextitem is None or HERE not in Path(nextitem.path).parents:
        while _cleanups:
            _cleanups.pop()()


class RedisServer:
    """A real, throwaway redis-server on a free port (no persistence) that a test may stop and start again."""

    def __init__(self):
        import shutil

        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.port, self.proc = free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        import subprocess
        import time

        import redis

        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return self
            except redis.ConnectionError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    pytest.skip("redis-server did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        import subprocess

        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


@pytest.fixture(scope="session")
def redis_url():
    """A real, throwaway redis-server on a free port (no persistence); skips when the binary is missing."""
    server = RedisServer().start()
    yield server.url
    server.stop()


def redis_jobs_config(redis_url: str, result_store: str) -> dict:
    return {"app_name": "rjobs", "route_prefix": "/rjobs",
            "jobs": {"backend": "redis", "redis_url": redis_url, "queue_name": "sdserve-test", "concurrency": 2,
                     "max_retries": 2, "lease_s": 2, "result_store": result_store},
            "models": [{"engine": {"name": "tiny-sd", "device": "cpu", "limits": {"max_steps": 400}},
                        "deployment": {"num_gpus": 0, "num_cpus": 0.5}}]}


@pytest.fixture(scope="session")
def redis_jobs_url(serve_url, redis_url, tmp_path_factory):
    """App "rjobs" at /rjobs on the shared Serve: async jobs on the Redis backend (2 s leases)."""
    from ray import serve

    from serving.builder import build_app
    from serving.config import ServingConfig

    cfg = redis_jobs_config(redis_url, str(tmp_path_factory.mktemp("rjobs-results")))
    serve.run(build_app(ServingConfig.model_validate(cfg)), name="rjobs", route_prefix="/rjobs")
    return f"{serve_url}/rjobs"


OPS_KEYS = ["ops-a", "ops-b", "ops-c"]


@pytest.fixture(scope="session")
def ops_redis():
    """The "ops" app's own Redis, which its tests stop and start again."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ops_url(serve_url, ops_redis, tmp_path_factory):
    """App "ops" at /ops: a tight failed-auth throttle, a small generation budget with a large read budget, and
    jobs on a Redis of its own (tests take it down)."""
    from ray import serve

    from serving.builder import build_app
    from serving.config import ServingConfig

    cfg = {"app_name": "ops", "route_prefix": "/ops",
           "security": {"api_keys": OPS_KEYS, "auth_failures": {"max_failures": 3, "window_s": 3},
                        "rate_limit": {"requests_per_minute": 6, "burst": 2, "reads_per_minute": 600,
                                       "read_burst": 100}},
           "jobs": {"backend": "redis", "redis_url": ops_redis.url, "queue_name": "ops", "lease_s": 2,
                    "result_store": str(tmp_path_factory.mktemp("ops-results"))},
           "models": [{"engine": {"name": "tiny-sd", "device": "cpu", "limits": {"max_batch_size": 4}},
                       "deployment": {"num_gpus": 0, "num_cpus": 0.5}}]}
    serve.run(build_app(ServingConfig.model_validate(cfg)), name="ops", route_prefix="/ops")
    return f"{serve_url}/ops"
