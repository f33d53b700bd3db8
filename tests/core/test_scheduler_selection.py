"""Schedulers by name: every one runs, unknown names list the valid ones, scheduler state is per call."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import diffusers
import pytest

from core.schedulers import SCHEDULERS, UnknownSchedulerError, check_scheduler_name, make_scheduler
from core.schemas import GenerationRequest

REQUIRED = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "ddim", "lcm")


def test_required_names_present():
    assert set(REQUIRED) <= set(SCHEDULERS)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_runs(engine, req, ok, name):
    out = ok(engine.generate([req(seed=3, scheduler=name)])[0])
    assert out.scheduler == name and out.steps == 2 and len(out.images) == 1


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_make_scheduler_builds_a_fresh_configured_instance(engine, name):
    cls_name, overrides = SCHEDULERS[name]
    a = make_scheduler(name, engine.base_scheduler_config)
    b = make_scheduler(name, engine.base_scheduler_config)
    assert isinstance(a, getattr(diffusers, cls_name)) and a is not b  # (unipc: a subclass, core/unipc_sync_free.py)
    for key, value in overrides.items():
        assert a.config[key] == value, key
    # The model's training schedule carries over.
    assert a.config.beta_schedule == engine.base_scheduler_config.beta_schedule


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UnknownSchedulerError) as info:
        check_scheduler_name("k_lms_turbo")
    text = str(info.value)
    assert "k_lms_turbo" in text and all(name in text for name in SCHEDULERS)


def test_unknown_name_in_request_names_field():
    from pydantic import ValidationError

    from core.config import format_validation_error

    with pytest.raises(ValidationError) as info:
        GenerationRequest(prompt="a fox", scheduler="k_lms_turbo")
    assert format_validation_error(info.value).startswith("scheduler:")


def test_different_schedulers_give_different_images(engine, req, ok):
    a = ok(engine.generate([req(seed=3, scheduler="euler")])[0]).images[0].data
    b = ok(engine.generate([req(seed=3, scheduler="euler_a")])[0]).images[0].data
    assert a != b


def test_shared_scheduler_untouched_by_calls(engine, req, ok):
    base = engine.pipe.scheduler
    before = (base.num_inference_steps, getattr(base, "_step_index", None))
    ok(engine.generate([req(seed=3, scheduler="euler", steps=3)])[0])
    assert engine.pipe.scheduler is base
    assert (base.num_inference_steps, getattr(base, "_step_index", None)) == before


def test_concurrent_calls_with_different_schedulers_match_sequential(engine, req, ok, decode):
    """Concurrent callers share UNet calls (the step scheduler batches them), each image with its own scheduler
    instance: the same images as one at a time, up to the rounding of batched CPU matmuls (2/255)."""
    jobs = {"euler_a": [req(seed=s, scheduler="euler_a", steps=3) for s in (11, 12, 13)],
            "dpmpp_2m": [req(seed=s, scheduler="dpmpp_2m", steps=3) for s in (11, 12, 13)]}
    sequential = {name: [ok(engine.generate([r])[0]).images[0].data for r in rs] for name, rs in jobs.items()}
    start = threading.Barrier(2)

    def run(name):
        start.wait()
        return [ok(engine.generate([r])[0]).images[0].data for r in jobs[name]]

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, name) for name in jobs}
        concurrent = {name: f.result(timeout=120) for name, f in futures.items()}
    for name in jobs:
        for a, b in zip(concurrent[name], sequential[name]):
            assert abs(decode(a) - decode(b)).max() <= 2, name
