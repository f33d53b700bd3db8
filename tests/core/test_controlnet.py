"""ControlNet in the step loop (core/controlnet.py): a ControlNet changes the image, scale 0 (or a start/end window
that excludes every step) equals no ControlNet, one request equals diffusers' ControlNet pipelines (SD1.5, SDXL),
text-to-image, img2img and ControlNet requests share UNet calls and each equals its alone-run, canny maps are
edges and cached, and bad inputs/configs name what is wrong."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from core.schemas import GenerationError

MAX_DIFF = 2  # of 255: batched CPU fp32 matmuls round differently from batch-1 ones
NETS = [{"name": "edges", "source": "embedded:tiny-sd-controlnet"},
        {"name": "pose", "source": "embedded:tiny-sd-controlnet"}]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cn_engine(sdserve_cache_dir):
    from core.engine import Engine
    from tests.core.conftest import cpu_config

    return Engine(cpu_config(sdserve_cache_dir, controlnets=NETS)).load()


@pytest.fixture(scope="module")
def control_png() -> bytes:
    """A 64x64 picture with shapes (canny finds their edges)."""
    arr = np.full((64, 64, 3), 30, np.uint8)
    arr[10:40, 12:30] = (220, 40, 40)
    arr[30:58, 34:60] = (40, 200, 90)
    return png(arr)


def pixels(decode, outcome):
    return decode(outcome.images[0].data)


def control(image, **kw):
    return [{"model": kw.pop("model", "edges"), "image": image, **kw}]


def join_at(engine, step: int, request, joined: dict):
    def on_step(_ids, done, _total):
        if done == step and "job" not in joined:
            joined["job"] = engine.submit(request)
    return on_step


def test_a_controlnet_changes_the_image_and_scale_zero_equals_none(cn_engine, req, ok, decode, control_png):
    assert sorted(cn_engine.controlnets) == ["edges", "pose"] and cn_engine.footprint.controlnets > 0
    base = dict(seed=3, steps=3)
    none = pixels(decode, ok(cn_engine.generate([req(**base)])[0]))
    on = pixels(decode, ok(cn_engine.generate([req(control=control(control_png), **base)])[0]))
    zero = pixels(decode, ok(cn_engine.generate([req(control=control(control_png, scale=0), **base)])[0]))
    # a window that excludes every step of 3 (i / 3 < 0.9 for i = 0, 1, 2): off throughout
    outside = pixels(decode, ok(cn_engine.generate([req(control=control(control_png, start=0.9), **base)])[0]))
    first = pixels(decode, ok(cn_engine.generate([req(control=control(control_png, end=0.34), **base)])[0]))
    assert np.abs(on - none).mean() > 1
    assert np.array_equal(zero, none) and np.array_equal(outside, none)
    assert 0 < np.abs(first - none).mean() and not np.array_equal(first, on)
    other = png(np.asarray(Image.open(io.BytesIO(control_png)))[::-1].copy())
    flipped = pixels(decode, ok(cn_engine.generate([req(control=control(other), **base)])[0]))
    assert np.abs(flipped - on).mean() > 0.5, "the control image steers the result"


def _diffusers_controlnet(pipe_cls, engine, net_name, seed, **kw) -> np.ndarray:
    pipe = pipe_cls(**engine.pipe.components, controlnet=engine.controlnets[net_name])
    pipe.set_progress_bar_config(disable=True)
    out = pipe(generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np", **kw).images[0]
    return (out * 255).round().astype(np.int16)


def test_equals_diffusers_controlnet_pipeline(cn_engine, req, ok, decode, control_png):
    from diffusers import StableDiffusionControlNetPipeline

    fields = dict(seed=12, steps=4, guidance_scale=6.0, negative_prompt="",
                  control=control(control_png, scale=0.8, start=0.0, end=0.6))
    ours = pixels(decode, ok(cn_engine.generate([req(**fields)])[0]))
    theirs = _diffusers_controlnet(StableDiffusionControlNetPipeline, cn_engine, "edges", 12,
                                   prompt="a red fox in the snow", image=Image.open(io.BytesIO(control_png)),
                                   num_inference_steps=4, guidance_scale=6.0, controlnet_conditioning_scale=0.8,
                                   control_guidance_start=0.0, control_guidance_end=0.6)
    assert np.abs(ours - theirs).max() <= MAX_DIFF


def test_sdxl_controlnet_equals_diffusers(make_config, req, ok, decode, control_png):
    from diffusers import StableDiffusionXLControlNetPipeline

    from core.engine import Engine

    eng = Engine(make_config(source="embedded:tiny-sdxl", name="tiny-sdxl",
                             controlnets=[{"name": "edges-xl", "source": "embedded:tiny-sdxl-controlnet"}])).load()
    assert eng.list_controlnets() == [{"name": "edges-xl", "family": "sdxl",
                                       "source": "embedded:tiny-sdxl-controlnet"}]
    fields = dict(seed=13, steps=3, guidance_scale=5.0, negative_prompt="")
    none = pixels(decode, ok(eng.generate([req(**fields)])[0]))
    ours = pixels(decode, ok(eng.generate([req(control=control(control_png, model="edges-xl"), **fields)])[0]))
    assert np.abs(ours - none).mean() > 1
    theirs = _diffusers_controlnet(StableDiffusionXLControlNetPipeline, eng, "edges-xl", 13,
                                   prompt="a red fox in the snow", image=Image.open(io.BytesIO(control_png)),
                                   num_inference_steps=3, guidance_scale=5.0, height=64, width=64, negative_prompt="")
    assert np.abs(ours - theirs).max() <= MAX_DIFF


def test_txt2img_img2img_and_controlnet_share_calls_and_equal_alone_runs(cn_engine, req, ok, decode, control_png):
    init = png(np.asarray(Image.open(io.BytesIO(control_png)).convert("RGB"))[:, ::-1].copy())
    reqs = [req(seed=21, steps=3),
            req(seed=22, steps=4, init_image=init, strength=0.5, scheduler="euler_a"),
            req(seed=23, steps=3, control=control(control_png, scale=0.7)),
            req(seed=24, steps=4, init_image=init, strength=0.75, guidance_scale=1.0,  # no CFG: one row
                control=control(control_png, preprocess="canny") + control(control_png, model="pose", end=0.5))]
    alone = [pixels(decode, ok(cn_engine.generate([r])[0])) for r in reqs]
    calls, hist = cn_engine.scheduler.calls, dict(cn_engine.scheduler.batch_histogram)
    batched = [ok(o) for o in cn_engine.generate(reqs)]
    assert [o.batch_size for o in batched] == [4, 4, 4, 4]
    assert cn_engine.scheduler.batch_histogram[4] > hist.get(4, 0)
    assert cn_engine.scheduler.calls - calls <= 4  # the longest schedule's calls: nothing split the group
    for a, b in zip(alone, batched):
        assert np.abs(a - pixels(decode, b)).max() <= MAX_DIFF
    for target, solo in zip(reqs[2:], alone[2:]):
        joined: dict = {}
        ok(cn_engine.generate([req(seed=25, steps=5)], step_callback=join_at(cn_engine, 1, target, joined))[0])
        late = ok(joined["job"].future.result(timeout=300))
        assert late.batch_size == 2
        assert np.abs(solo - pixels(decode, late)).max() <= MAX_DIFF


def test_canny_maps_are_edges_and_cached(cn_engine, req, ok, control_png):
    from core.controlnet import prepare

    from core.caches import LRUCache

    cache = LRUCache("control_maps", 1)
    r = cn_engine.resolve(req(control=control(control_png, preprocess="canny")))
    specs = prepare(cn_engine.config, r, cache=cache)
    specs_again = prepare(cn_engine.config, r, cache=cache)
    assert (cache.misses, cache.hits) == (1, 1) and specs_again[0].map is specs[0].map
    edges = specs[0].map
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[:, :, 0].sum() < 0.3 * 255 * 64 * 64  # edges, not the filled shapes
    before = cn_engine.info()["caches"]["control_maps"]["hits"]
    ok(cn_engine.generate([req(seed=1, control=control(control_png, preprocess="canny"))])[0])
    assert cn_engine.info()["caches"]["control_maps"]["hits"] == before + 1


def test_bad_control_inputs_name_their_field(cn_engine, req, control_png):
    cases = [(control(control_png, model="depth"), "control.0.model", "edges, pose"),
             (control(control_png) + control(b"GIF89a...."), "control.1.image", "GIF")]
    for ctrl, field, says in cases:
        err = cn_engine.generate([req(control=ctrl)])[0]
        assert isinstance(err, GenerationError) and err.kind == "validation" and err.field == field, err
        assert says in err.message


def test_controlnet_configs_are_checked(make_config):
    from pydantic import ValidationError

    from core.engine import Engine
    from core.loading import ModelLoadError

    with pytest.raises(ValidationError, match="unique"):
        make_config(controlnets=[NETS[0], NETS[0]])
    with pytest.raises(ValidationError, match="tiny-sd-controlnet"):
        make_config(controlnets=[{"name": "x", "source": "embedded:nope"}])
    with pytest.raises(ModelLoadError, match="sdxl"):
        Engine(make_config(controlnets=[{"name": "xl", "source": "embedded:tiny-sdxl-controlnet"}])).load()


def test_compiled_unet_runs_controlnet_calls_eagerly_without_recompiling(make_config, req, ok, control_png, caplog):
    """A compiled engine (CPU torch.compile, backend "eager"; as in test_step_scheduler_compile.py): ControlNet
    calls run eagerly (residuals are inputs the warmed graphs do not take) and img2img calls use the warmed graph:
    no new graph while serving."""
    import logging

    from core.engine import Engine
    from core.step_scheduler import unique_graphs

    eng = Engine(make_config(limits={"max_batch_size": 2}, controlnets=NETS[:1])).load()
    eng.pipe.unet.compile(backend="eager", fullgraph=True, dynamic=False)
    eng.compiled = True
    eng.config.optimization.warmup_steps = 2
    eng.config.optimization.warmup_shapes = [(64, 64, 2)]
    eng.warmup()
    eng.scheduler.mark_warm()
    graphs = unique_graphs()
    mixed = [req(seed=1, steps=2, control=control(control_png)), req(seed=2, steps=3, init_image=control_png),
             req(seed=3, steps=2)]
    with caplog.at_level(logging.WARNING, logger="core.step_scheduler"):
        outs = [ok(o) for o in eng.generate(mixed)]
    assert max(o.batch_size for o in outs) == 2
    assert unique_graphs() == graphs and eng.info()["scheduling"]["recompiles"] == 0
    assert "new graph" not in caplog.text
