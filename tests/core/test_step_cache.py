"""DeepCache-style step caching (core/step_cache.py, `optimization.step_cache`): opt-in, exact when off, shallow
steps really skip the deep blocks, and the images stay close to the uncached ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from core.config import EngineConfig, OptimizationConfig, format_validation_error
from core.engine import Engine
from core.step_cache import apply_step_cache, remove_step_cache

MODELS = ["tiny-sd", "tiny-sdxl"]


def build(make_config, model: str, step_cache: dict | None) -> Engine:
    return Engine(make_config(source=f"embedded:{model}", name=model,
                              optimization={"warmup_steps": 0, "step_cache": step_cache})).load()


@pytest.fixture(scope="module")
def uncached(make_config):
    return {m: build(make_config, m, None) for m in MODELS}


@pytest.fixture(scope="module")
def cached(make_config):
    return {m: build(make_config, m, {"interval": 3}) for m in MODELS}


def pixels(engine, ok, decode, req, **kw):
    return decode(ok(engine.generate([req(**kw)])[0]).images[0].data)


@pytest.mark.parametrize("model", MODELS)
def test_interval_1_gives_exactly_the_uncached_images(make_config, uncached, ok, req, model):
    every_step_full = build(make_config, model, {"interval": 1})
    a = ok(uncached[model].generate([req(seed=5, steps=4)])[0])
    b = ok(every_step_full.generate([req(seed=5, steps=4)])[0])
    assert a.images[0].data == b.images[0].data
    assert every_step_full.step_cache.full_calls == 4 and every_step_full.step_cache.shallow_calls == 0


@pytest.mark.parametrize("model", MODELS)
def test_deep_blocks_run_only_on_full_steps(cached, ok, req, model):
    engine = cached[model]
    unet = engine.pipe.unet
    calls = {"mid": 0, "deepest_down": 0, "deepest_up": 0, "first_down": 0, "last_up": 0}
    watched = {"mid": unet.mid_block, "deepest_down": unet.down_blocks[-1], "deepest_up": unet.up_blocks[0],
               "first_down": unet.down_blocks[0], "last_up": unet.up_blocks[-1]}
    handles = [m.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
               for k, m in watched.items()]
    try:
        ok(engine.generate([req(seed=1, steps=7)])[0])
    finally:
        for h in handles:
            h.remove()
    # interval 3, first step full: steps 0, 3 and 6 run the whole UNet; 1, 2, 4, 5 only the shallow blocks.
    assert engine.step_cache.full_calls == 3 and engine.step_cache.shallow_calls == 4
    assert calls == {"mid": 3, "deepest_down": 3, "deepest_up": 3, "first_down": 7, "last_up": 7}


@pytest.mark.parametrize("model", MODELS)
def test_cached_images_are_deterministic_close_and_not_the_uncached_ones(uncached, cached, ok, req, decode, model):
    a = ok(cached[model].generate([req(seed=11, steps=6)])[0]).images[0].data
    b = ok(cached[model].generate([req(seed=11, steps=6)])[0]).images[0].data
    assert a == b  # same seed, same bytes; also: the step count restarts at every pipeline call
    assert cached[model].step_cache.step == 6
    with_cache = pixels(cached[model], ok, decode, req, seed=11, steps=6)
    without = pixels(uncached[model], ok, decode, req, seed=11, steps=6)
    other_seed = pixels(uncached[model], ok, decode, req, seed=12, steps=6)
    assert with_cache.shape == without.shape
    cost = np.abs(with_cache - without).mean()
    # A real change, yet small next to the gap between two seeds (random weights: a proxy for quality).
    assert 0 < cost < 0.1 * np.abs(without - other_seed).mean()


def test_step_count_restarts_at_each_call_even_in_a_batch(cached, ok, req):
    engine = cached["tiny-sd"]
    alone = ok(engine.generate([req(seed=21, steps=5)])[0]).images[0].data
    outs = [ok(o) for o in engine.generate([req(seed=21, steps=5), req(seed=22, steps=5)])]
    assert outs[0].batch_size == 2 and engine.step_cache.full_calls == 2  # steps 0 and 3 of this call
    again = ok(engine.generate([req(seed=21, steps=5)])[0]).images[0].data
    assert again == alone


def small_sd15_like_unet():
    """Cross-attention in the shallow blocks, as in SD1.5 (the tiny models have plain blocks there)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8).eval()


def unet_and_inputs(name: str, tiny_folders, size: int):
    from diffusers import UNet2DConditionModel

    g = torch.Generator().manual_seed(0)
    if name == "sd15-like":
        unet = small_sd15_like_unet()
    else:
        unet = UNet2DConditionModel.from_pretrained(tiny_folders[name], subfolder="unet").eval()
    kw = {"encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embeds + size/crop time ids
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    if name == "sd15-like":
        mask = torch.ones(2, 77)
        mask[:, 40:] = 0
        kw["encoder_attention_mask"] = mask
    return unet, torch.randn(2, 4, size, size, generator=g), kw


@pytest.mark.parametrize("name,size", [("tiny-sd", 8), ("tiny-sdxl", 8), ("sd15-like", 8), ("sd15-like", 9)])
def test_shallow_step_on_its_own_deep_state_equals_the_full_unet(tiny_folders, name, size):
    """Checks the shallow path's wiring (embeddings, skip features, up block inputs): fed the deep state of the
    very same inputs, it must reproduce the whole UNet. size 9: forward's upsample_size path."""
    unet, sample, kw = unet_and_inputs(name, tiny_folders, size)
    t = torch.tensor(500)
    with torch.no_grad():
        reference = unet(sample, t, **kw).sample
        hook = apply_step_cache(unet, interval=10, first_full_steps=1)
        full = unet(sample, t, return_dict=False, **kw)[0]  # step 0: full, keeps the deep state
        shallow = unet(sample, t, **kw).sample  # step 1: shallow, return_dict output too
    assert (hook.full_calls, hook.shallow_calls) == (1, 1)
    assert torch.equal(full, reference)
    torch.testing.assert_close(shallow, reference, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(shallow).all()
    remove_step_cache(unet)
    with torch.no_grad():
        assert torch.equal(unet(sample, t, **kw).sample, reference)


def test_shallow_step_falls_back_to_full_for_a_new_size_without_reset(tiny_folders):
    unet, sample, kw = unet_and_inputs("tiny-sd", tiny_folders, 8)
    hook = apply_step_cache(unet, interval=10, first_full_steps=1)
    with torch.no_grad():
        unet(sample, 10, **kw)
        unet(sample[:1], 10, encoder_hidden_states=kw["encoder_hidden_states"][:1])  # batch 1: nothing cached
    assert (hook.full_calls, hook.shallow_calls) == (2, 0)


@pytest.mark.parametrize("bad", [{"interval": 0}, {"interval": 11}, {"interval": 2.5}, {"first_full_steps": 0},
                                 {"first_full_steps": 51}, {"interval": 3, "warm": 1}, 3])
def test_bad_step_cache_settings_are_rejected_naming_the_key(bad):
    with pytest.raises(ValidationError) as err:
        EngineConfig(optimization={"step_cache": bad})
    assert format_validation_error(err.value).startswith("optimization.step_cache")


def test_step_cache_is_off_by_default_and_takes_defaults():
    assert OptimizationConfig().step_cache is None
    on = OptimizationConfig(step_cache={})
    assert (on.step_cache.interval, on.step_cache.first_full_steps) == (3, 1)


@pytest.mark.gpu
@pytest.mark.slow
def test_step_cache_composes_with_reduce_overhead_compile(make_config, req, ok, decode):
    """Both step functions compiled (CUDA graphs), the full/shallow choice eager; warm-up compiles both."""
    def engine(compile_mode):
        return Engine(make_config(device="cuda", limits={"max_batch_size": 2}, optimization={
            "warmup_steps": 2, "compile": compile_mode, "step_cache": {"interval": 3}})).load()

    compiled = engine("reduce-overhead")
    assert compiled.compiled and compiled.pipe.unet._compiled_call_impl is None  # the step functions instead
    a, b = (ok(compiled.generate([req(seed=3, steps=8)])[0]).images[0].data for _ in range(2))
    assert a == b and compiled.step_cache.shallow_calls == 5
    eager = pixels(engine("none"), ok, decode, req, seed=3, steps=8)
    assert np.abs(decode(a) - eager).mean() < 2  # compiled kernels round differently; nothing else may differ


def test_samples_at_different_cache_phases_keep_their_own_images(cached, ok, req, decode):
    """Continuous batching with the step cache: a request joining mid-way starts with full steps while the
    running one is at a shallow step; calls group samples by phase and each keeps its own deep feature, so both
    images equal their alone runs."""
    engine = cached["tiny-sd"]
    first, second = req(seed=41, steps=7), req(seed=42, steps=5, scheduler="euler_a")
    alone = [ok(engine.generate([r])[0]) for r in (first, second)]
    joined = {}

    def on_step(_ids, done, _total):
        if done == 1 and "job" not in joined:
            joined["job"] = engine.submit(second)

    together = ok(engine.generate([first], step_callback=on_step)[0])
    late = ok(joined["job"].future.result(timeout=300))
    assert together.batch_size == 2 and late.batch_size == 2  # shallow steps shared a call
    for a, b in ((alone[0], together), (alone[1], late)):
        assert np.abs(decode(a.images[0].data) - decode(b.images[0].data)).max() <= 2
