"""Compile caches: where Inductor writes, and that replicas with different CPU counts share compiled graphs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core.optimizations import configure_compile_cache


def test_cache_dir_replaces_inductors_own_default(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what Inductor writes when it first looks
    path = configure_compile_cache(str(tmp_path))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == path == str(tmp_path / "inductor")
    assert os.path.isdir(path)


def test_an_explicit_inductor_cache_dir_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    configure_compile_cache(str(tmp_path / "sdserve"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


_CHILD = """
import json, sys
from core.config import EngineConfig
from core.engine import Engine
cfg = EngineConfig(name="tiny-sd", device="cuda", cache_dir=sys.argv[1], optimization={
    "compile": "reduce-overhead", "compile_vae": False, "warmup_steps": 1})
e = Engine(cfg).load()
print(json.dumps(e.applied.get("compile_counters")))
"""


@pytest.mark.gpu
@pytest.mark.slow
def test_replicas_with_other_cpu_counts_hit_the_same_compiled_graphs(tmp_path):
    """Ray gives each replica OMP_NUM_THREADS = its num_cpus; the thread count is part of Inductor's cache key."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    runs = []
    for threads in ("16", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], env=env, capture_output=True,
                             text=True, check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0].get("fxgraph_cache_miss"), runs  # the first one compiled
    assert runs[1].get("fxgraph_cache_hit") and not runs[1].get("fxgraph_cache_miss"), runs
