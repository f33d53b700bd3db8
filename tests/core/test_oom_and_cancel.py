"""Failure paths, by fault injection into the real UNet: CUDA OOM (split retry, then a per-request error),
cancellation from the step callback. The engine stays usable after each."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.schemas import GenerationCancelled, GenerationError


@pytest.fixture
def unet_faults(engine, monkeypatch):
    """fail(n): the next n UNet calls raise CUDA OOM (n=None: every call). Returns the UNet batch sizes seen."""
    unet = engine.pipe.unet
    forward = unet.forward
    state = {"left": 0, "batches": []}

    def faulty(sample, *args, **kwargs):
        state["batches"].append(sample.shape[0])
        if state["left"] is None or state["left"] > 0:
            if state["left"] is not None:
                state["left"] -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", faulty)  # the per-call pipeline copies share this module

    def fail(n):
        state["left"] = n
        state["batches"].clear()
        return state["batches"]

    return fail


def test_oom_once_recovers_by_splitting(engine, req, ok, decode, unet_faults):
    reqs = [req(seed=s) for s in (21, 22, 23, 24)]
    baseline = [ok(o) for o in engine.generate(reqs)]
    batches = unet_faults(1)
    outs = [ok(o) for o in engine.generate(reqs)]
    # First call (4 images, CFG doubles the UNet batch) failed; the retry ran two halves of 2 images.
    assert batches[0] == 8 and set(batches[1:]) == {4}
    assert [o.batch_size for o in outs] == [2, 2, 2, 2]
    for a, b in zip(baseline, outs):
        assert np.abs(decode(a.images[0].data) - decode(b.images[0].data)).max() <= 2
    assert not getattr(engine.pipe.vae, "use_tiling", False)  # forced tiling was undone


def test_a_size_that_fit_only_tiled_is_decoded_tiled_from_then_on(engine, req, ok, unet_faults, monkeypatch):
    """Without this, every later request of that size would run out of memory once and retry split."""
    engine.tiled_sizes.clear()
    tiled: list[bool] = []
    decode = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda latents, force: (tiled.append(force), decode(latents, force))[1])
    steps = req().steps  # UNet calls per generation
    batches = unet_faults(1)
    ok(engine.generate([req(seed=5, width=80)])[0])
    assert tiled == [True] and len(batches) == 1 + steps  # the failed call, then its tiled retry
    ok(engine.generate([req(seed=6, width=80)])[0])
    ok(engine.generate([req(seed=6)])[0])  # other sizes are untouched
    assert tiled == [True, True, False] and len(batches) == 1 + 3 * steps  # no more OOMs, no retries
    engine.tiled_sizes.clear()


def test_oom_always_fails_that_request_only(engine, req, ok, unet_faults):
    unet_faults(None)
    outs = engine.generate([req(seed=1), req(seed=2)])
    for out in outs:
        assert isinstance(out, GenerationError) and out.kind == "oom"
        assert "out of GPU memory" in out.message
    unet_faults(0)
    ok(engine.generate([req(seed=3)])[0])
    engine.check_health()


def test_oom_in_one_group_leaves_other_groups(engine, req, ok, unet_faults):
    """Only the first pipeline call (and its retry) fail; a request of another size still succeeds."""
    batches = unet_faults(2)  # the first call and the retry of its single sample
    outs = engine.generate([req(seed=1), req(seed=2, width=72)])
    assert isinstance(outs[0], GenerationError) and outs[0].kind == "oom"
    assert ok(outs[1]).width == 72
    assert batches[:2] == [2, 2]


def test_other_errors_are_internal_and_engine_survives(engine, req, ok, monkeypatch):
    unet = engine.pipe.unet

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(unet, "forward", broken)
    out = engine.generate([req(seed=1)])[0]
    assert isinstance(out, GenerationError) and out.kind == "internal" and "kernel exploded" in out.message
    monkeypatch.undo()
    ok(engine.generate([req(seed=1)])[0])
    engine.check_health()


def test_cancel_from_step_callback(engine, req, ok):
    """Cancelling request 0 stops its group; request 1 (another size, another group) is unaffected."""
    seen = []

    def on_step(request_ids, step, total):
        seen.append((tuple(request_ids), step, total))
        if 0 in request_ids and step == 1:
            raise GenerationCancelled("client went away")

    outs = engine.generate([req(seed=1, steps=3), req(seed=2, steps=3, width=72)], step_callback=on_step)
    assert isinstance(outs[0], GenerationCancelled) and outs[0].kind == "cancelled"
    result = ok(outs[1])
    assert result.width == 72
    assert ((0,), 1, 3) in seen and ((0,), 2, 3) not in seen  # stopped right after step 1
    assert [s for s in seen if s[0] == (1,)] == [((1,), 1, 3), ((1,), 2, 3), ((1,), 3, 3)]
    alone = ok(engine.generate([req(seed=2, steps=3, width=72)])[0])
    assert alone.images[0].data == result.images[0].data
