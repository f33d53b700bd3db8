"""Compiled UNet under the step scheduler (CPU torch.compile, backend "eager": Dynamo tracing without Inductor):
after the warm-up of every row bucket, no scheduler, step count, guidance or seed change traces a new graph; a
recompile while serving is counted in engine.info() and logged."""
from __future__ import annotations

import logging

import pytest

from core.step_scheduler import unique_graphs


@pytest.fixture(scope="module")
def compiled(make_config):
    from core.engine import Engine

    eng = Engine(make_config(limits={"max_batch_size": 2}, optimization={"warmup_steps": 0})).load()
    eng.pipe.unet.compile(backend="eager", fullgraph=True, dynamic=False)
    eng.compiled = True  # what install_fastpath sets when optimization.compile is on (CUDA-only here)
    eng.config.optimization.warmup_steps = 2
    eng.config.optimization.warmup_shapes = [(64, 64, 2)]
    eng.warmup()
    eng.scheduler.mark_warm()
    return eng


def test_warmup_covers_every_row_bucket(compiled):
    # images buckets 1, 2 -> UNet rows 2, 4 (CFG; a guidance <= 1 image pads into them), and VAE images 1, 2
    assert {s for s in compiled.warmed if s[0] == "unet"} == {("unet", 64, 64, r) for r in (2, 4)}
    assert {s for s in compiled.warmed if s[0] == "vae"} == {("vae", 64, 64, n) for n in (1, 2)}


def test_default_guidance_compiles_only_cfg_row_buckets(compiled):
    from core.fastpath import row_buckets

    assert row_buckets(compiled) == [2, 4]


def test_no_recompile_across_schedulers_steps_guidance_and_seeds(compiled, req, caplog):
    graphs = unique_graphs()
    mixed = [req(seed=1, scheduler="euler", steps=2), req(seed=2, scheduler="euler_a", steps=3, guidance_scale=7.5),
             req(seed=3, scheduler="dpmpp_2m_karras", steps=2, guidance_scale=1.0),
             req(seed=4, scheduler="heun", steps=2, guidance_scale=3.0), req(seed=5, scheduler="unipc", steps=4),
             req(seed=6, scheduler="ddim", steps=3, guidance_scale=1.0)]
    with caplog.at_level(logging.WARNING, logger="core.step_scheduler"):
        outs = compiled.generate(mixed)
        outs += compiled.generate(mixed[::-1])
    assert all(o.batch_size == 2 for o in outs)  # calls really were mixed (max_batch_size 2)
    assert {s for s in compiled.warmed if s[0] == "unet"} == {("unet", 64, 64, r) for r in (2, 4)}
    assert unique_graphs() == graphs
    assert compiled.info()["scheduling"]["recompiles"] == 0
    assert "new graph" not in caplog.text


def test_turbo_defaults_also_compile_one_row_buckets(make_config):
    """An engine whose default guidance is <= 1 (turbo / LCM) gets non-CFG row buckets too: warmed, not padded."""
    from core.engine import Engine
    from core.fastpath import row_buckets

    eng = Engine(make_config(limits={"max_batch_size": 4}, defaults={"guidance_scale": 0.0},
                             optimization={"warmup_steps": 0})).load()
    assert row_buckets(eng) == [1, 2, 4, 8]
    eng.compiled = True
    eng.config.optimization.warmup_steps, eng.config.optimization.warmup_shapes = 1, [(64, 64, 4)]
    eng.warmup()
    assert sorted(k for k in eng.warmup_times) == ["64x64x1", "64x64x1-nocfg", "64x64x2", "64x64x4"]
    assert {s[3] for s in eng.warmed if s[0] == "unet"} == {1, 2, 4, 8}


def test_a_recompile_while_serving_is_counted_and_logged(compiled, req, caplog):
    """The check above can fail: a graph compiled while serving (here: a direct call at an unwarmed batch) shows
    up in the counter at the next UNet call."""
    import torch

    unet = compiled.pipe.unet
    with torch.no_grad():
        unet(torch.zeros(3, 4, 8, 8), torch.zeros(3), encoder_hidden_states=torch.zeros(3, 77, 32))
    with caplog.at_level(logging.WARNING, logger="core.step_scheduler"):
        compiled.generate([req(seed=9)])
    assert compiled.info()["scheduling"]["recompiles"] >= 1
    assert "new graph" in caplog.text
