"""optimization.capture_step (core/captured_step.py): the UNet + CFG + Euler step as one function gives the same
latents as the usual path (UNet call, CFG combine, each sample's scheduler.step), bit for bit when uncompiled; other
schedulers take the usual path. Compiled, within float noise of eager: tests/core/test_compile_artifacts.py (the
suite's one CPU Inductor compile, shared with the compile-artifacts store test)."""
from __future__ import annotations

import pytest

from core.schemas import GenerationRequest


@pytest.fixture(scope="module")
def engines(make_config):
    from core.engine import Engine

    plain = Engine(make_config()).load()
    captured = Engine(make_config(optimization={"warmup_steps": 0, "capture_step": True})).load()
    return plain, captured


def _images(engine, reqs):
    return [[img.data for img in out.images] for out in engine.generate(reqs)]


def test_captured_euler_steps_make_the_same_images(engines):
    plain, captured = engines
    # a mixed group: CFG and no CFG (guidance 1), other guidance scales, steps and seeds in one UNet call
    reqs = [GenerationRequest(prompt="a fox", seed=1, steps=4, guidance_scale=7.5),
            GenerationRequest(prompt="a owl", seed=2, steps=3, guidance_scale=1.0),
            GenerationRequest(prompt="a cat", seed=3, steps=5, guidance_scale=3.0, num_images=2)]
    before = captured.captured_step.calls
    assert _images(captured, reqs) == _images(plain, reqs)
    assert captured.captured_step.calls - before >= 5  # every step of the longest request went through it


def test_other_schedulers_take_the_usual_path(engines):
    plain, captured = engines
    reqs = [GenerationRequest(prompt="a fox", seed=4, steps=4, scheduler="dpmpp_2m")]
    before = captured.captured_step.calls
    assert _images(captured, reqs) == _images(plain, reqs)
    assert captured.captured_step.calls == before
