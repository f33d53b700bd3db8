"""Warm-up at load: the configured shapes run once, through the normal generate path."""
from __future__ import annotations

import pytest

from core.engine import Engine


def test_warmup_runs_configured_shapes(make_config, req, ok):
    eng = Engine(make_config(optimization={"warmup_steps": 1, "warmup_shapes": [(64, 72, 2)]})).load()
    assert eng.warmup_s > 0 and eng.load_s > 0
    ok(eng.generate([req(seed=1)])[0])
    assert eng.info()["family"] == "sd15" and eng.info()["device"] == "cpu"


def test_warmup_batch_above_images_per_request_limit(make_config):
    cfg = make_config(limits={"max_batch_size": 16, "max_images_per_request": 8},
                      optimization={"warmup_steps": 1, "warmup_shapes": [(64, 64, 12)]})
    Engine(cfg).load()


def test_compiled_engines_gpu_thread_owns_cuda_graph_state(make_config):
    """reduce-overhead calls run on the engine's GPU thread; Inductor's CUDA-graph trees live in thread-local
    state that a plain thread lacks when another thread imported Inductor first (an AssertionError on the H100)."""
    import threading

    from torch._inductor import cudagraph_trees  # imported here, in the main thread, first

    from core.engine import Engine

    probe = threading.Thread(target=lambda: None)
    probe.start(), probe.join()
    engine = Engine(make_config(optimization={"compile": "reduce-overhead"}))
    seen = engine._gpu.submit(lambda: (threading.current_thread().name,
                                       hasattr(cudagraph_trees.local, "tree_manager_containers"))).result()
    assert seen[0].startswith("gpu")
    assert seen[1], "the GPU thread has no CUDA-graph tree state: its first compiled call would assert"
    plain = threading.Thread(target=lambda: seen_plain.append(hasattr(cudagraph_trees.local,
                                                                      "tree_manager_containers")))
    seen_plain: list[bool] = []
    plain.start(), plain.join()
    assert seen_plain == [False]  # what any other thread sees: the state really is per thread
