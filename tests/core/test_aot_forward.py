"""compile_artifacts="aot": the first process compiles and saves per-shape functions; a later one loads them
without any Dynamo tracing and makes the same bytes as eager (CPU, tiny model; Inductor needs a C++ compiler)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_CHILD = """
import hashlib, json, sys
from core.config import EngineConfig
from core.engine import Engine
from core.schemas import GenerationRequest
aot = sys.argv[1] == "aot"
opt = {"compile": "default", "compile_artifacts": "aot", "warmup_steps": 1} if aot else {}
e = Engine(EngineConfig(name="tiny-sd", device="cpu", cache_dir=sys.argv[2], optimization=opt)).load()
out = e.generate([GenerationRequest(prompt="a fox", seed=3, steps=3)])[0]
from torch._dynamo.utils import counters
print(json.dumps({"aot": {k: v for k, v in e.applied.items() if k.startswith("aot_")},
                  "traced_graphs": counters["stats"].get("unique_graphs", 0),
                  "png": hashlib.sha256(out.images[0].data).hexdigest()}), flush=True)
import os
os._exit(0)  # skip interpreter teardown: Inductor's compile workers sometimes abort there ("terminate called")
"""
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(mode: str, cache_dir: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, cache_dir], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="Inductor on CPU needs a C++ compiler")
def test_a_second_process_loads_the_compiled_forwards_without_tracing(tmp_path):
    cache = str(tmp_path / "cache")
    first = _run("aot", cache)
    assert first["aot"] == {"aot_unet": {"loaded": 0, "compiled": 1}, "aot_vae-decoder": {"loaded": 0, "compiled": 1}}
    assert len(os.listdir(os.path.join(cache, "aot"))) == 2
    second = _run("aot", cache)
    assert second["aot"] == {"aot_unet": {"loaded": 1, "compiled": 0}, "aot_vae-decoder": {"loaded": 1, "compiled": 0}}
    assert second["traced_graphs"] == 0  # nothing went through Dynamo
    eager = _run("eager", cache)
    assert first["png"] == second["png"] == eager["png"]


def test_aot_is_refused_with_step_cache_and_falls_back_to_compile_caches(tmp_path, monkeypatch):
    from core.config import MemoryLevel, OptimizationConfig
    from core.embedded import build_pipeline
    from core.optimizations import apply_compile

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # apply_compile points it at the cache dir

    pipe = build_pipeline("tiny-sd", 0)
    opt = OptimizationConfig(compile="default", compile_artifacts="aot", step_cache={"interval": 2})
    applied = apply_compile(pipe, opt, MemoryLevel.NONE, str(tmp_path))
    assert "compile_artifacts" not in applied and applied["compile"] == "default"
