"""The step-level scheduler (core/step_scheduler.py): mixed requests share UNet calls, requests join a running
batch and leave early, an image depends only on its own request (alone == batched == joined later, every
scheduler), cancel leaves the others' images unchanged, small shapes are not held back by large ones, and
admission=batch reproduces request-level batching."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from diffusers.utils.torch_utils import randn_tensor

from core.schedulers import SCHEDULERS, make_scheduler
from core.schemas import GenerationCancelled, GenerationError

MAX_DIFF = 2  # of 255: batched CPU fp32 matmuls round differently from batch-1 ones


@pytest.fixture
def unet_rows(engine, monkeypatch):
    """The batch size (rows) of every UNet call from now on."""
    unet, forward, rows = engine.pipe.unet, engine.pipe.unet.forward, []

    def spy(sample, *args, **kwargs):
        rows.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    return rows


def join_at(engine, step: int, request, joined: dict):
    """A step_callback for a running request: when it reaches `step`, submit `request` (it joins at the next
    UNet call: the loop admits before every call). joined["job"] is the joiner's Job."""
    def on_step(_ids, done, _total):
        if done == step and "job" not in joined:
            joined["job"] = engine.submit(request)
    return on_step


def pixels(decode, outcome):
    return decode(outcome.images[0].data)


def test_mixed_requests_share_unet_calls(engine, req, ok, unet_rows):
    """Steps, scheduler, guidance (CFG on and off) and seed do not split calls: one call per step for all."""
    mixed = [req(seed=1, steps=3, scheduler="euler", guidance_scale=7.5),
             req(seed=2, steps=2, scheduler="euler_a", guidance_scale=5.0),
             req(seed=3, steps=4, scheduler="dpmpp_2m_karras", guidance_scale=1.0),  # no CFG: one row
             req(seed=4, steps=3, scheduler="unipc", guidance_scale=6.0, num_images=2)]
    calls_before = engine.scheduler.calls
    outs = [ok(o) for o in engine.generate(mixed)]
    assert [o.batch_size for o in outs] == [5, 5, 5, 5]
    # 5 images: 4 with CFG (2 rows) + 1 without; after 2 steps euler_a leaves, after 3 euler and unipc.
    assert unet_rows == [9, 9, 7, 1]
    assert engine.scheduler.calls - calls_before == 4
    assert [(o.steps, o.scheduler) for o in outs] == [(3, "euler"), (2, "euler_a"), (4, "dpmpp_2m_karras"),
                                                      (3, "unipc")]


def test_a_request_joins_mid_way_and_another_leaves_early(engine, req, ok, decode, unet_rows):
    long, short = req(seed=10, steps=5), req(seed=11, steps=2, scheduler="euler_a")
    joined: dict = {}
    first = ok(engine.generate([long], step_callback=join_at(engine, 1, short, joined))[0])
    second = ok(joined["job"].future.result(timeout=300))
    # Step 1 alone, steps 2-3 together (the joiner's 2 steps), then the long one alone again.
    assert unet_rows == [2, 4, 4, 2, 2]
    assert first.batch_size == 2 and second.batch_size == 2
    unet_rows.clear()
    alone = [ok(engine.generate([r])[0]) for r in (long, short)]
    assert np.abs(pixels(decode, alone[0]) - pixels(decode, first)).max() <= MAX_DIFF
    assert np.abs(pixels(decode, alone[1]) - pixels(decode, second)).max() <= MAX_DIFF


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_alone_equals_batched_equals_joined_later(engine, req, ok, decode, scheduler, monkeypatch):
    """For every scheduler (ancestral, multistep, second-order included): the same image alone, inside a batch of
    other schedulers/guidance/steps, and joining a running batch at its second step; and the initial noise is
    exactly the image's own CPU generator's."""
    import core.denoise_state as ds

    noises = []
    original = ds.initial_latents

    def spy(generator, shape, device, dtype, sigma):
        out = original(generator, shape, device, dtype, sigma)
        noises.append(out.clone())
        return out

    monkeypatch.setattr(ds, "initial_latents", spy)
    target = req(seed=4242, negative_prompt="blurry", scheduler=scheduler, steps=3)
    alone = ok(engine.generate([target])[0])
    others = [req(seed=7, scheduler="euler_a", steps=4, guidance_scale=1.0),
              req(seed=8, scheduler="dpmpp_2m", steps=2, guidance_scale=7.0)]
    batched = [ok(o) for o in engine.generate([others[0], target, others[1]])]
    joined: dict = {}
    ok(engine.generate([req(seed=9, steps=5)], step_callback=join_at(engine, 1, target, joined))[0])
    late = ok(joined["job"].future.result(timeout=300))
    assert batched[1].batch_size == 3 and late.batch_size == 2 and alone.batch_size == 1
    assert torch.equal(noises[0], noises[2]) and torch.equal(noises[0], noises[-1])
    sched = make_scheduler(scheduler, engine.base_scheduler_config)
    sched.set_timesteps(3)
    expected = randn_tensor((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(4242)) * sched.init_noise_sigma
    torch.testing.assert_close(noises[0], expected, rtol=0, atol=0)
    for other in (batched[1], late):
        diff = np.abs(pixels(decode, alone) - pixels(decode, other)).max()
        assert diff <= MAX_DIFF, f"{scheduler}: image differs by {diff}/255"


def test_cancel_in_a_shared_batch_leaves_the_others_unchanged(engine, req, ok, decode, unet_rows):
    reqs = [req(seed=21, steps=4), req(seed=22, steps=4, scheduler="euler_a"), req(seed=23, steps=4)]

    def on_step(ids, step, _total):
        if ids == [1] and step == 1:
            raise GenerationCancelled("client went away")

    outs = engine.generate(reqs, step_callback=on_step)
    assert isinstance(outs[1], GenerationCancelled) and outs[1].kind == "cancelled"
    assert unet_rows == [6, 4, 4, 4]  # it left after its first step
    assert ok(outs[0]).batch_size == 3
    for i in (0, 2):
        alone = ok(engine.generate([reqs[i]])[0])
        assert np.abs(pixels(decode, alone) - pixels(decode, outs[i])).max() <= MAX_DIFF


def test_a_short_request_of_another_shape_finishes_before_a_long_one(engine, req, ok):
    """Interleaving across shapes: the least remaining work runs first, so a small request that arrives while a
    long one runs is done long before it, and the long one still finishes."""
    long_at_short_done, joined, state = [], {}, {}

    def on_progress(step, _total, _latents):
        if step == 1:
            joined["job"] = engine.submit(req(seed=31, steps=2, width=72))
            joined["job"].future.add_done_callback(lambda _f: long_at_short_done.append(state["long"].reported))

    state["long"] = engine.submit(req(seed=30, steps=8), on_progress=on_progress)
    long = ok(state["long"].future.result(timeout=300))
    assert ok(joined["job"].future.result()).width == 72
    assert long_at_short_done and long_at_short_done[0] < 8, long_at_short_done  # the long one had steps left
    assert long.batch_size == 1  # other shape: never the same call


def test_starvation_bound_runs_a_passed_over_group(make_config, req, ok):
    """With a zero-ish starvation bound the groups alternate instead of the shortest running to the end."""
    from core.engine import Engine

    eng = Engine(make_config(scheduling={"starvation_s": 1e-6})).load()
    seen = []
    outs = eng.generate([req(seed=1, steps=4), req(seed=2, steps=2, width=72)],
                        step_callback=lambda ids, step, _t: seen.append(ids[0]))
    assert all(not isinstance(o, GenerationError) for o in outs)
    assert seen[:4] in ([0, 1, 0, 1], [1, 0, 1, 0]), seen


def test_admission_batch_reproduces_request_level_batching(make_config, req, ok, decode):
    """admission=batch: a request arriving while its shape's batch runs waits for the batch to finish."""
    from core.engine import Engine

    eng = Engine(make_config(scheduling={"admission": "batch"})).load()
    rows, forward = [], eng.pipe.unet.forward
    eng.pipe.unet.forward = lambda sample, *a, **k: (rows.append(sample.shape[0]), forward(sample, *a, **k))[1]
    joined: dict = {}
    first = ok(eng.generate([req(seed=10, steps=5)], step_callback=join_at(eng, 1, req(seed=11, steps=2),
                                                                             joined))[0])
    second = ok(joined["job"].future.result(timeout=300))
    assert rows == [2] * 5 + [2] * 2 and first.batch_size == 1 and second.batch_size == 1
    assert second.timings.queue_s > 0
    together = [ok(o) for o in eng.generate([req(seed=10, steps=5), req(seed=11, steps=2)])]
    assert [o.batch_size for o in together] == [2, 2]  # submitted together they still share a batch


def test_async_generate_and_cancel_by_the_awaiting_task(engine, req, ok, unet_rows):
    """Cancelling the task that awaits generate_async (a Serve client that went away) stops the request at the
    next step: the replica is free after at most one more UNet call."""
    async def scenario():
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        task = asyncio.ensure_future(engine.generate_async(
            req(seed=40, steps=50), on_progress=lambda s, t, _l: loop.call_soon_threadsafe(started.set)))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await engine.generate_async(req(seed=41, steps=2))

    cancelled_before = engine.info()["scheduling"]["cancelled_requests"]
    result = ok(asyncio.run(scenario()))
    assert engine.info()["scheduling"]["cancelled_requests"] == cancelled_before + 1
    assert result.batch_size == 1
    cancelled_calls = len(unet_rows) - 2
    assert 1 <= cancelled_calls <= 6, unet_rows  # not 50


def test_cancel_event_and_deadline(engine, req):
    cancel = threading.Event()
    job = engine.submit(req(seed=50, steps=40), on_progress=lambda s, t, _l: cancel.set(), cancel=cancel)
    out = job.future.result(timeout=300)
    assert isinstance(out, GenerationCancelled) and "cancelled at step 1/" in out.message
    late = engine.submit(req(seed=51, steps=40), timeout_s=0.0).future.result(timeout=300)
    assert isinstance(late, GenerationCancelled) and "deadline" in late.message


def test_progress_gives_steps_and_latents(engine, req, ok):
    seen = []
    job = engine.submit(req(seed=60, steps=3, num_images=2),
                        on_progress=lambda s, t, latents: seen.append((s, t, tuple(latents().shape))))
    ok(job.future.result(timeout=300))
    assert seen == [(1, 3, (2, 4, 8, 8)), (2, 3, (2, 4, 8, 8)), (3, 3, (2, 4, 8, 8))]


def test_info_reports_scheduling(engine, req, ok):
    ok(engine.generate([req(seed=70)])[0])
    info = engine.info()["scheduling"]
    assert info["admission"] == "step" and info["unet_calls"] >= 2 and info["recompiles"] == 0
    assert sum(info["batch_size_histogram"].values()) == info["unet_calls"]
    assert info["min_share"] == 0.25 and sum(info["picks"].values()) == info["unet_calls"]  # one pick per call
    assert info["share_unit"] == "calls" and info["call_ms"]["tiny-sd 64x64"] > 0, info  # auto: not compiled


def test_sdxl_pooled_embeddings_and_time_ids_follow_each_sample(make_config, req, ok, decode):
    """SDXL: each row carries its own pooled text embedding and add_time_ids (CFG and non-CFG rows mixed)."""
    from core.engine import Engine

    eng = Engine(make_config(source="embedded:tiny-sdxl", name="tiny-sdxl")).load()
    target = req(seed=5, prompt="a lighthouse", negative_prompt="fog", steps=3, scheduler="dpmpp_2m")
    alone = ok(eng.generate([target])[0])
    mixed = [ok(o) for o in eng.generate([req(seed=6, steps=2, guidance_scale=1.0), target,
                                          req(seed=7, prompt="other", steps=4, scheduler="euler_a")])]
    assert mixed[1].batch_size == 3
    assert np.abs(pixels(decode, alone) - pixels(decode, mixed[1])).max() <= MAX_DIFF


def test_a_request_cancelled_while_waiting_gets_its_outcome_at_once(make_config, req, ok):
    """admission=batch keeps the second request waiting; cancelling it answers it before the batch ends."""
    from core.engine import Engine

    eng = Engine(make_config(scheduling={"admission": "batch"})).load()
    state = {}

    def on_progress(step, _total, _latents):
        if step == 1:
            state["waiting"] = eng.submit(req(seed=2, steps=2))
        if step == 2:
            state["waiting"].cancel.set()
        if step == 3:
            state["answered_during_batch"] = state["waiting"].finished

    ok(eng.submit(req(seed=1, steps=5), on_progress=on_progress).future.result(timeout=300))
    assert state["answered_during_batch"]
    out = state["waiting"].future.result()
    assert isinstance(out, GenerationCancelled) and "step 0/" in out.message
