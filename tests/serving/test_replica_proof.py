"""Issue #7's proof harness (benchmarks/replica_proof.py, `sdserve bench replicas`), smoke-tested on CPU.

The integration test runs the command as it runs on the GPU host - its own local Ray, here with 2 CPUs and one
logical GPU - on configs/serve-four-replicas-tiny.yaml: two tiny models x two replicas at 0.25 GPU each. The
other tests feed the verdict reports that must fail, so a broken check cannot pass silently.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.replica_load import classify, request_plan, size_menu
from benchmarks.replica_proof import verdict
from serving.config import load_serving_config
from tests.free_ports import free_port

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "serve-four-replicas-tiny.yaml"


@pytest.fixture(scope="module")
def proof(sdserve_cache_dir, tmp_path_factory) -> tuple[int, dict, str]:
    out = tmp_path_factory.mktemp("proof") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "sdserve", "bench", "replicas", str(TINY), "--num-gpus", "1", "--num-cpus", "2",
           "--steps", "2", "--requests", "40", "--concurrency", "4", "--port", str(free_port()), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.exists(), f"no report (exit {proc.returncode}): {proc.stderr[-3000:]}"
    return proc.returncode, json.loads(out.read_text()), proc.stdout


@pytest.mark.integration
def test_four_fractional_replicas_pass_the_proof_on_cpu(proof):
    rc, report, stdout = proof
    assert report["passed"] is True and report["failures"] == [] and rc == 0, report.get("failures")
    assert '"passed": true' in stdout  # the summary printed for the log
    assert report["cluster"]["GPU"] == 1 and report["gpu_available_after_deploy"] == 0  # 4 x 0.25 fill the GPU
    for name in ("tiny-xl", "tiny-sd"):
        model = report["replicas_start"]["models"][name]
        assert model["status"] == "HEALTHY" and model["replica_states"] == {"RUNNING": 2}
        reps = model["replicas"]
        assert len(reps) == 2 and len({r["replica"] for r in reps}) == 2 and len({r["pid"] for r in reps}) == 2
        for r in reps:
            assert r["state"] == "ALIVE" and r["info_pid"] == r["pid"]  # the actor table and info() agree
            assert r["gpu_ids"] == ["0"] and r["gpu_fraction"] == 0.25 and r["device"] == "cpu"
            assert r["vram_budget_bytes"] == 2**28  # memory.vram_budget_gib: 0.25
        assert report["deployments"][f"model-{name}"]["ray_actor_options"]["num_gpus"] == 0.25
        end = report["replicas_end"]["models"][name]
        assert {(r["replica"], r["pid"]) for r in end["replicas"]} == {(r["replica"], r["pid"]) for r in reps}
        assert end["status"] == "HEALTHY"
        m = report["by_model"][name]
        assert m["outcomes"]["ok"] > 0 and m["rejected_sizes"] == ["1024x1024"]
    totals = report["totals"]
    assert totals["ok"] + totals["capacity"] == report["load"]["sent"] == 40
    assert totals["oom"] == totals["error_5xx"] == totals["error_4xx"] == totals["transport"] == 0
    assert not [r for r in report["requests"] if isinstance(r["status"], int) and r["status"] >= 500]
    assert report["rejections_exercised"] and all(
        r["status"] == 422 and r["kind"] == "capacity" and "VRAM budget" in r["message"]
        for r in report["clean_rejections"])
    assert report["budgets_enforced"] is False  # no CUDA: the budget is the engine's estimate only
    assert report["nvidia_smi"]["available"] is False or report["nvidia_smi"]["samples"] > 0


@pytest.mark.integration
def test_the_verdict_fails_on_a_replaced_replica_an_oom_or_a_5xx(proof):
    _, report, _ = proof
    restarted = copy.deepcopy(report)
    rep = restarted["replicas_end"]["models"]["tiny-sd"]["replicas"][0]
    rep["pid"] += 100000
    passed, failures = verdict(restarted)
    assert not passed and any("replicas changed" in f for f in failures)

    replaced = copy.deepcopy(report)
    reps = replaced["replicas_end"]["models"]["tiny-xl"]["replicas"]
    reps[0]["state"] = "DEAD"
    reps.append({**reps[0], "replica": "newone", "state": "ALIVE", "pid": 1})
    passed, failures = verdict(replaced)
    assert not passed and any("died" in f for f in failures) and any("created during the run" in f for f in failures)

    for status, detail, outcome in ((503, {"message": "out of GPU memory at 1024x1024", "code": "oom"}, "oom"),
                                    (500, {"message": "generation failed", "code": "internal_error"}, "error_5xx"),
                                    ("ReadTimeout", None, "transport")):
        bad = copy.deepcopy(report)
        bad["requests"][0].update(status=status, outcome=classify(status, {"detail": detail})[0])
        assert bad["requests"][0]["outcome"] == outcome
        passed, failures = verdict(bad)
        assert not passed and any(outcome in f for f in failures)


def test_classify_tells_clean_rejections_from_failures():
    capacity = {"detail": [{"loc": ["body", "width"], "msg": "4096x4096 needs about 37.9 GiB at memory level none; "
                            "this replica's VRAM budget is 19.8 GiB: use a smaller size", "type": "value_error"}]}
    assert classify(422, capacity)[:2] == ("capacity", "capacity")
    assert classify(422, {"detail": [{"loc": ["body", "steps"], "msg": "steps: must be <= 50"}]})[0] == "error_4xx"
    assert classify(503, {"detail": {"message": "model sdxl is overloaded", "code": "overloaded"}})[0] == "backpressure"
    assert classify(503, {"detail": {"message": "out of GPU memory", "code": "oom"}})[0] == "oom"
    assert classify(500, {"detail": {"message": "CUDA out of memory. Tried to allocate", "code": "internal_error"}})[
        0] == "oom"  # an OOM that escaped the engine's handling still counts as one
    assert classify(200, {})[0] == "ok"


def test_the_h100_plan_mixes_sizes_that_fit_and_sizes_that_cannot():
    config = load_serving_config(ROOT / "configs" / "serve-four-replicas-h100.yaml")
    assert [(m.name, m.deployment.num_replicas, m.deployment.num_gpus) for m in config.models] == [
        ("sdxl", 2, 0.25), ("sd15", 2, 0.25)]
    assert all(m.engine.optimization.compile == "none" and m.engine.memory.level.value == "auto"
               for m in config.models)
    sizes = {m.name: {(w, h) for w, h, _ in size_menu(m)} for m in config.models}
    assert {(1024, 1024), (2048, 2048), (4096, 4096)} <= sizes["sdxl"]
    assert {(512, 512), (4096, 4096)} <= sizes["sd15"]
    plan = request_plan(config.models, 200, seed=0, steps=[4, 6, 8])
    assert plan == request_plan(config.models, 200, seed=0, steps=[4, 6, 8])  # seeded
    assert {b["model"] for b in plan} == {"sdxl", "sd15"}
    assert any(b["width"] * b["height"] >= 2560 * 2560 for b in plan if b["model"] == "sdxl")
    assert any(b["width"] == 4096 for b in plan if b["model"] == "sd15")
    assert {b["num_images"] for b in plan if b["model"] == "sd15"} == set(range(1, 9))
