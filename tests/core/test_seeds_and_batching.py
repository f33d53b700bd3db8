"""Per-sample seeds: an image depends only on its own request, alone or inside a batch, for every sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from core.batching import compat_key, plan_batches
from core.schedulers import SCHEDULERS, make_scheduler
from core.schemas import MAX_SEED

MAX_DIFF = 2  # of 255: batched matmuls round differently from batch-1 ones on CPU fp32


@pytest.fixture
def captured_latents(monkeypatch):
    """Initial latents of every pipeline call (after prepare_latents: noise x init_noise_sigma), in call order.

    Patched on the class: the engine calls a per-call shallow copy of its pipeline.
    """
    calls: list[torch.Tensor] = []
    original = StableDiffusionPipeline.prepare_latents

    def spy(self, *args, **kwargs):
        latents = original(self, *args, **kwargs)
        calls.append(latents.detach().clone())
        return latents

    monkeypatch.setattr(StableDiffusionPipeline, "prepare_latents", spy)
    return calls


def others(req, n=3, **kw):
    return [req(prompt=f"another prompt {i}", negative_prompt=f"neg {i}", seed=1000 + i, **kw) for i in range(n)]


def test_images_are_not_constant(engine, req, ok, decode):
    """Guards the equality tests below: different seeds give different, non-flat noise images."""
    a, b = (decode(ok(engine.generate([req(seed=s)])[0]).images[0].data) for s in (1, 2))
    assert a.std() > 5 and np.abs(a - b).max() > 20


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_alone_or_in_a_batch_of_four(engine, req, ok, decode, captured_latents, scheduler):
    target = req(seed=4242, negative_prompt="blurry", scheduler=scheduler)
    alone = ok(engine.generate([target])[0])
    batch = [ok(o) for o in engine.generate([*others(req, 1, scheduler=scheduler), target,
                                             *others(req, 2, scheduler=scheduler)])]
    assert len(captured_latents) == 2 and captured_latents[1].shape[0] == 4  # one call, batch of 4
    assert batch[1].batch_size == 4 and alone.batch_size == 1
    # Identical initial latents, bit for bit, and equal to noise drawn from the sample's own CPU generator.
    assert torch.equal(captured_latents[0][0], captured_latents[1][1])
    sched = make_scheduler(scheduler, engine.base_scheduler_config)
    sched.set_timesteps(2)
    expected = randn_tensor((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(4242)) * sched.init_noise_sigma
    torch.testing.assert_close(captured_latents[0], expected, rtol=0, atol=0)
    # Same image, up to float rounding of batched matmuls.
    diff = np.abs(decode(alone.images[0].data) - decode(batch[1].images[0].data)).max()
    assert diff <= MAX_DIFF, f"{scheduler}: batched image differs by {diff}/255"


def test_batch_members_differ(engine, req, ok, decode):
    outs = [ok(o) for o in engine.generate(others(req, 4))]
    pix = [decode(o.images[0].data) for o in outs]
    assert all(np.abs(pix[i] - pix[j]).max() > 20 for i in range(4) for j in range(i + 1, 4))


def test_same_seed_twice_gives_identical_bytes(engine, req, ok):
    a = ok(engine.generate([req(seed=77, scheduler="euler_a")])[0])
    b = ok(engine.generate([req(seed=77, scheduler="euler_a")])[0])
    assert a.images[0].data == b.images[0].data


def test_same_request_twice_in_one_batch(engine, req, ok, decode, captured_latents):
    outs = [ok(o) for o in engine.generate([req(seed=9), req(seed=9)])]
    assert outs[0].batch_size == 2
    assert torch.equal(captured_latents[0][0], captured_latents[0][1])
    # Not bit-exact: rows of one batched CPU matmul may be blocked (and so rounded) differently.
    assert np.abs(decode(outs[0].images[0].data) - decode(outs[1].images[0].data)).max() <= MAX_DIFF


def test_seed_absent_is_drawn_and_reported(engine, req, ok, decode):
    out = ok(engine.generate([req(num_images=3)])[0])
    seed = out.seed
    assert [im.seed for im in out.images] == [seed, (seed + 1) % (MAX_SEED + 1), (seed + 2) % (MAX_SEED + 1)]
    # Image i is exactly what seed+i gives: replay each one alone.
    for i, image in enumerate(out.images):
        replay = ok(engine.generate([req(seed=image.seed)])[0])
        assert np.abs(decode(replay.images[0].data) - decode(image.data)).max() <= MAX_DIFF, i


def test_seed_wraps_at_32_bits(engine, req, ok):
    out = ok(engine.generate([req(seed=MAX_SEED, num_images=2)])[0])
    assert [im.seed for im in out.images] == [MAX_SEED, 0]


def test_num_images_larger_than_max_batch_is_chunked(make_config, req, ok, decode):
    from core.engine import Engine

    eng = Engine(make_config(limits={"max_batch_size": 2})).load()
    out = ok(eng.generate([req(seed=300, num_images=5)])[0])
    assert len(out.images) == 5 and out.batch_size == 2
    assert [im.seed for im in out.images] == [300, 301, 302, 303, 304]
    single = ok(eng.generate([req(seed=303)])[0])
    assert np.abs(decode(single.images[0].data) - decode(out.images[3].data)).max() <= MAX_DIFF


def test_incompatible_requests_run_in_separate_calls(engine, req, ok, captured_latents):
    outs = [ok(o) for o in engine.generate([req(seed=1), req(seed=2, width=72), req(seed=3, guidance_scale=1.0),
                                            req(seed=4)])]
    assert [o.batch_size for o in outs] == [2, 1, 1, 2]
    assert outs[1].width == 72 and [c.shape[0] for c in captured_latents] == [2, 1, 1]


def test_compat_key_covers_everything_that_changes_the_computation(engine, req):
    base = engine.resolve(req(seed=1))
    for change in ({"width": 72}, {"height": 72}, {"steps": 3}, {"scheduler": "ddim"}, {"guidance_scale": 1.0},
                   {"model": "other"}):
        assert compat_key(base) != compat_key(base.model_copy(update=change)), change
    for same in ({"seed": 2}, {"prompt": "x"}, {"negative_prompt": "y"}, {"num_images": 3},
                 {"output_format": "jpeg"}):
        assert compat_key(base) == compat_key(base.model_copy(update=same)), same


def test_plan_batches_keeps_first_seen_order_and_chunks():
    from core.schemas import GenerationRequest

    def r(**kw):
        fields = dict(prompt="p", width=64, height=64, steps=2, guidance_scale=5.0, scheduler="euler", model="m",
                      negative_prompt="", seed=0)
        return GenerationRequest(**{**fields, **kw})

    plan = plan_batches([(0, r(num_images=3)), (1, r(width=128)), (2, r(seed=10, num_images=2))], max_batch=4)
    assert [[(s.request_index, s.image_index, s.seed) for s in samples] for _, samples in plan] == [
        [(0, 0, 0), (0, 1, 1), (0, 2, 2), (2, 0, 10)], [(2, 1, 11)], [(1, 0, 0)]]
