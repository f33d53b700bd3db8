"""`sdserve serve` start-up progress (serving/startup.py): state lines while replicas start, then each model's
load stages and warm-up read from a ready replica."""
from __future__ import annotations

import pytest

from serving.startup import StartupReporter, describe_ready, describe_state


def test_state_line_names_counts_states_and_message():
    line = describe_state("sdxl", "UPDATING", {"STARTING": 2, "RUNNING": 1}, 3, 95.04, "Deploying new version.\nx")
    assert line == "model sdxl: updating, 1/3 replicas running (2 starting), 95.0s - Deploying new version."
    assert describe_state("a", "HEALTHY", {"RUNNING": 1}, None, 2, "ok") == "model a: healthy, 1/1 replicas running, 2.0s"


def test_ready_line_lists_load_stages_warmup_and_compile():
    info = {"device": "cuda", "dtype": "fp16", "load_s": 41.26, "load_times": {"weights": 12.0, "fastpath": 29.0},
            "warmup_s": 180.0, "warmup_times": {"1024x1024x1": 120.0, "1024x1024x4": 60.0},
            "optimizations": {"compile": "max-autotune", "compile_cache_hit": False, "sdpa": True}}
    assert describe_ready("sdxl", info) == (
        "model sdxl ready on cuda fp16: load 41.3s (weights 12.0s, fastpath 29.0s), warm-up 180.0s "
        "(1024x1024x1 120.0s, 1024x1024x4 60.0s), {'compile': 'max-autotune', 'compile_cache_hit': False}")


@pytest.mark.integration
def test_reports_while_serve_run_waits(serve_url):
    from ray import serve

    from serving.builder import build_app
    from serving.config import ServingConfig

    config = ServingConfig.model_validate({
        "app_name": "startup", "route_prefix": "/startup",
        "models": [{"engine": {"name": "tiny-start", "device": "cpu", "optimization": {"warmup_steps": 1}},
                    "deployment": {"num_gpus": 0, "num_cpus": 0.25}}]})
    lines: list[str] = []
    try:
        with StartupReporter(config, out=lines.append, poll_s=0.2):
            serve.run(build_app(config), name="startup", route_prefix="/startup")
    finally:
        serve.delete("startup", _blocking=False)  # (not waiting for the replicas to stop: conftest.py)
    states = [line for line in lines if line.startswith("model tiny-start: ")]
    assert states and not states[0].startswith("model tiny-start: healthy"), lines  # seen while starting
    assert states[-1].startswith("model tiny-start: healthy, 1/1 replicas running"), lines
    ready = [line for line in lines if line.startswith("model tiny-start ready on cpu")]
    assert len(ready) == 1 and "load " in ready[0] and "warm-up " in ready[0], lines
