"""optimization.compile: cudagraphs (torch.compile's cudagraphs backend: Dynamo's graph replayed as CUDA graphs,
eager kernels, no Inductor). On CPU the backend runs the captured graph without graphs (torch skips CUDA graphs
for CPU tensors), which still exercises the engine's compiled path: row buckets warmed, the same pixels as eager,
no recompile across schedulers. The GPU test checks the real CUDA-graph replay against eager fp16."""
from __future__ import annotations

import numpy as np
import pytest

from core.step_scheduler import unique_graphs


def test_the_config_takes_cudagraphs_and_maps_it_to_the_backend(make_config):
    from core.optimizations import compile_kwargs

    cfg = make_config(optimization={"compile": "cudagraphs", "warmup_steps": 0})
    assert cfg.optimization.compile == "cudagraphs"
    assert compile_kwargs("cudagraphs") == {"backend": "cudagraphs"}
    assert compile_kwargs("reduce-overhead") == {"mode": "reduce-overhead"}
    with pytest.raises(ValueError, match="optimization.compile"):
        make_config(optimization={"compile": "cuda-graphs"})


def _mixed(req):
    return [req(seed=11, scheduler="euler", steps=3), req(seed=12, scheduler="dpmpp_2m_karras", steps=2,
                                                          guidance_scale=5.0),
            req(seed=13, scheduler="euler_a", steps=4, guidance_scale=1.0)]


def test_cpu_engine_with_the_backend_warms_its_buckets_and_matches_eager(make_config, engine, req, ok, decode):
    from core.engine import Engine

    before = unique_graphs()
    eng = Engine(make_config(limits={"max_batch_size": 2},
                             optimization={"compile": "cudagraphs", "warmup_steps": 1,
                                           "warmup_shapes": [(64, 64, 2), (96, 64, 2)]})).load()
    assert eng.compiled and eng.applied["compile"] == "cudagraphs"
    assert {s for s in eng.warmed if s[0] == "unet"} == {("unet", w, h, r) for w, h in ((64, 64), (96, 64))
                                                         for r in (2, 4)}
    graphs = unique_graphs()
    # automatic dynamic shapes: the first static graph, then one more each time another input dimension turns
    # out to vary (rows, then width): 3 graphs for 2 sizes x 2 buckets, at most 4 however many sizes and buckets
    assert graphs - before <= 3, graphs - before
    outs = [ok(o) for o in eng.generate(_mixed(req))]
    assert unique_graphs() == graphs and eng.info()["scheduling"]["recompiles"] == 0
    assert max(o.batch_size for o in outs) == 2  # the calls were shared (max_batch_size 2)
    for out, reference in zip(outs, eng_eager_images(engine, req, ok)):
        diff = np.abs(decode(out.images[0].data) - decode(reference))
        assert diff.max() <= 2, diff.max()


def eng_eager_images(engine, req, ok) -> list[bytes]:
    return [ok(engine.generate([r])[0]).images[0].data for r in _mixed(req)]


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager_fp16(make_config, req, ok, decode):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from core.engine import Engine

    base = {"device": "cuda", "dtype": "fp16", "limits": {"max_batch_size": 2}}
    eager = Engine(make_config(**base)).load()
    graphed = Engine(make_config(**base, optimization={"compile": "cudagraphs", "warmup_steps": 2,
                                                       "warmup_shapes": [(64, 64, 2)]})).load()
    graphs = unique_graphs()
    for _ in range(2):  # the second round replays recorded graphs
        outs = [ok(o) for o in graphed.generate(_mixed(req))]
    assert unique_graphs() == graphs and graphed.info()["scheduling"]["recompiles"] == 0
    for out, r in zip(outs, _mixed(req)):
        diff = np.abs(decode(out.images[0].data) - decode(ok(eager.generate([r])[0]).images[0].data))
        assert diff.mean() < 2.0 and (diff > 16).mean() < 0.01, (diff.mean(), diff.max())
