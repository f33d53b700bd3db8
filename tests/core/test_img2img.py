"""img2img and inpainting in the step loop (core/img2img.py): the output follows the init image's size and
changes with strength; inpainting keeps the init image's pixels outside the (blurred) mask with a regular and a
9-channel inpainting UNet; img2img/inpainting requests share UNet calls with text-to-image ones and each equals
its alone-run (batched and joined mid-way); bad inputs name their field; the caches hit on repeats."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from core.schemas import GenerationError

MAX_DIFF = 2  # of 255: batched CPU fp32 matmuls round differently from batch-1 ones


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def init_png() -> bytes:
    """A 96x80 smooth colour image (a gradient: resizing it stays close to it)."""
    y, x = np.mgrid[0:80, 0:96]
    return png(np.stack([x * 2, y * 3, (x + y)], -1).astype(np.uint8))


@pytest.fixture(scope="module")
def mask_png() -> bytes:
    m = np.zeros((80, 96), np.uint8)
    m[24:56, 32:72] = 255
    return png(m)


def pixels(decode, outcome):
    return decode(outcome.images[0].data)


def kept_area(mask_png: bytes, blur: int) -> np.ndarray:
    """Where the blurred mask is 0: the pixels that must be the init image's."""
    mask = Image.open(io.BytesIO(mask_png)).convert("L")
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(mask) == 0


def join_at(engine, step: int, request, joined: dict):
    def on_step(_ids, done, _total):
        if done == step and "job" not in joined:
            joined["job"] = engine.submit(request)
    return on_step


def test_output_follows_the_init_image_and_changes_with_strength(engine, req, ok, decode, init_png):
    low = ok(engine.generate([req(seed=5, steps=4, init_image=init_png, strength=0.25)])[0])
    high = ok(engine.generate([req(seed=5, steps=4, init_image=init_png, strength=1.0)])[0])
    assert (low.width, low.height) == (96, 80) and pixels(decode, low).shape == (80, 96, 3)
    assert (low.steps, low.steps_run, high.steps_run) == (4, 1, 4)
    # Random weights: the VAE does not reconstruct, so "closer to the init image" is not observable; that the
    # output depends on the strength and on the init image is.
    assert np.abs(pixels(decode, low) - pixels(decode, high)).mean() > 1
    flipped = png(np.asarray(Image.open(io.BytesIO(init_png)).convert("RGB"))[::-1].copy())
    other = ok(engine.generate([req(seed=5, steps=4, init_image=flipped, strength=0.25)])[0])
    assert np.abs(pixels(decode, low) - pixels(decode, other)).mean() > 1
    sized = ok(engine.generate([req(seed=5, steps=4, init_image=init_png, width=64, height=128)])[0])
    assert (sized.width, sized.height) == (64, 128) and pixels(decode, sized).shape == (128, 64, 3)


def test_inpainting_keeps_the_pixels_outside_the_blurred_mask(engine, req, ok, decode, init_png, mask_png):
    init = np.asarray(Image.open(io.BytesIO(init_png)).convert("RGB")).astype(np.int16)
    for blur in (0, 4):
        out = ok(engine.generate([req(seed=6, steps=3, init_image=init_png, mask_image=mask_png, mask_blur=blur,
                                      strength=1.0)])[0])
        got, keep = pixels(decode, out), kept_area(mask_png, blur)
        assert np.array_equal(got[keep], init[keep])
        assert np.abs(got[~keep] - init[~keep]).mean() > 5, "the masked area was repainted"


def test_nine_channel_inpainting_unet(make_config, req, ok, decode, init_png, mask_png):
    from core.engine import Engine

    eng = Engine(make_config(source="embedded:tiny-sd-inpaint", name="tiny-inpaint")).load()
    assert eng.pipe.unet.config.in_channels == 9
    inpaint = req(seed=8, steps=3, init_image=init_png, mask_image=mask_png, strength=0.75)
    outs = [ok(o) for o in eng.generate([inpaint, req(seed=9, steps=3, width=96, height=80),
                                         req(seed=10, steps=3, init_image=init_png, strength=0.7)])]
    assert [o.batch_size for o in outs] == [3, 3, 3]  # inpainting, txt2img and img2img rows in one call
    init = np.asarray(Image.open(io.BytesIO(init_png)).convert("RGB")).astype(np.int16)
    keep = kept_area(mask_png, 4)
    assert np.array_equal(pixels(decode, outs[0])[keep], init[keep])
    alone = ok(eng.generate([inpaint])[0])
    assert np.abs(pixels(decode, alone) - pixels(decode, outs[0])).max() <= MAX_DIFF
    # diffusers' inpainting pipeline, inside the (unblurred) mask
    from diffusers import StableDiffusionInpaintPipeline

    sharp = ok(eng.generate([inpaint.model_copy(update={"mask_blur": 0})])[0])
    theirs = _diffusers_pixels(StableDiffusionInpaintPipeline, eng, prompt=inpaint.prompt, seed=8, strength=0.75,
                               image=Image.open(io.BytesIO(init_png)).convert("RGB"), num_inference_steps=3,
                               mask_image=Image.open(io.BytesIO(mask_png)), height=80, width=96,
                               guidance_scale=eng.default_guidance())
    area = ~kept_area(mask_png, 0)
    assert np.abs(pixels(decode, sharp)[area] - theirs[area]).max() <= MAX_DIFF


def test_img2img_and_inpainting_share_calls_and_equal_their_alone_runs(engine, req, ok, decode, init_png,
                                                                        mask_png):
    """One group per latent shape: steps and strength do not split it. Each image equals its alone-run when
    batched with text-to-image requests and when joining a running batch mid-way."""
    img2img = req(seed=31, steps=4, init_image=init_png, strength=0.5, scheduler="euler_a")
    inpaint = req(seed=32, steps=3, init_image=init_png, mask_image=mask_png, strength=0.8, scheduler="dpmpp_2m")
    txt = req(seed=33, steps=4, width=96, height=80)
    alone = [ok(engine.generate([r])[0]) for r in (img2img, inpaint)]
    hist_before = dict(engine.scheduler.batch_histogram)
    batched = [ok(o) for o in engine.generate([txt, img2img, inpaint])]
    assert [o.batch_size for o in batched] == [3, 3, 3]
    assert engine.scheduler.batch_histogram[3] > hist_before.get(3, 0)
    for a, b in zip(alone, batched[1:]):
        assert np.abs(pixels(decode, a) - pixels(decode, b)).max() <= MAX_DIFF
    for target, solo in zip((img2img, inpaint), alone):
        joined: dict = {}
        ok(engine.generate([req(seed=34, steps=5, width=96, height=80)],
                           step_callback=join_at(engine, 1, target, joined))[0])
        late = ok(joined["job"].future.result(timeout=300))
        assert late.batch_size == 2
        assert np.abs(pixels(decode, solo) - pixels(decode, late)).max() <= MAX_DIFF


def test_bad_inputs_name_their_field(engine, req, init_png, mask_png):
    small_mask = png(np.zeros((64, 64), np.uint8))
    cases = [(dict(init_image=init_png, mask_image=small_mask), "mask_image"),
             (dict(init_image=init_png, strength=0.1, steps=4), "strength"),
             (dict(init_image=b"not an image"), "init_image"),
             (dict(init_image="file:///etc/hosts"), "init_image"),
             (dict(control=[{"model": "pose", "image": init_png}]), "control.0.model")]  # none configured
    for fields, field in cases:
        err = engine.generate([req(**fields)])[0]
        assert isinstance(err, GenerationError) and err.kind == "validation" and err.field == field, (fields, err)


def test_caches_hit_on_repeats(make_config, req, ok, decode, init_png):
    from core.engine import Engine

    eng = Engine(make_config()).load()
    r = req(seed=40, steps=2, init_image=init_png, strength=0.5)
    first = ok(eng.generate([r])[0])
    again = ok(eng.generate([r.model_copy(update={"seed": 41})])[0])
    stats = eng.info()["caches"]
    assert stats["init_latents"]["hits"] == 1 and stats["init_latents"]["misses"] == 1
    assert stats["prompt_embeddings"]["hits"] == 1 and stats["prompt_embeddings"]["misses"] == 1
    assert not np.array_equal(pixels(decode, first), pixels(decode, again))  # a cached distribution, own sample
    again_same = ok(eng.generate([r])[0])
    assert np.array_equal(pixels(decode, first), pixels(decode, again_same))
    off = Engine(make_config(caches={"prompt_embeddings_mb": 0, "init_latents_mb": 0})).load()
    uncached = ok(off.generate([r])[0])
    assert np.abs(pixels(decode, uncached) - pixels(decode, first)).max() == 0
    assert off.info()["caches"]["init_latents"]["entries"] == 0


def _diffusers_pixels(pipe_cls, engine, **kw) -> np.ndarray:
    import torch

    pipe = pipe_cls(**engine.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(generator=[torch.Generator("cpu").manual_seed(kw.pop("seed"))], output_type="np", **kw).images[0]
    return (out * 255).round().astype(np.int16)


@pytest.mark.parametrize("inpaint", [False, True])
def test_equals_diffusers_img2img_and_inpaint_pipelines(engine, req, ok, decode, init_png, mask_png, inpaint):
    """The same images as diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline (inside the
    mask for inpainting: diffusers does not paste the kept pixels back)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    init = Image.open(io.BytesIO(init_png)).convert("RGB")
    fields = dict(seed=51, steps=4, strength=0.6, guidance_scale=6.0, negative_prompt="")
    kw = dict(prompt="a red fox in the snow", image=init, num_inference_steps=4, strength=0.6, guidance_scale=6.0,
              seed=51)
    if inpaint:
        fields.update(mask_image=mask_png, mask_blur=0)
        kw.update(mask_image=Image.open(io.BytesIO(mask_png)), height=80, width=96)
    ours = pixels(decode, ok(engine.generate([req(init_image=init_png, **fields)])[0]))
    theirs = _diffusers_pixels(StableDiffusionInpaintPipeline if inpaint else StableDiffusionImg2ImgPipeline,
                               engine, **kw)
    area = ~kept_area(mask_png, 0) if inpaint else np.ones(ours.shape[:2], bool)
    assert np.abs(ours[area] - theirs[area]).max() <= MAX_DIFF


def test_progress_counts_the_steps_an_img2img_request_runs(engine, req, ok, init_png):
    seen = []
    out = ok(engine.generate([req(seed=60, steps=4, init_image=init_png, strength=0.5)],
                             step_callback=lambda _ids, done, total: seen.append((done, total)))[0])
    assert out.steps_run == 2 and seen == [(1, 2), (2, 2)]


def test_image_fields_follow_the_text_fields_and_take_numbers_only(init_png):
    from pydantic import ValidationError

    from core.schemas import GenerationRequest

    names = list(GenerationRequest.model_fields)
    assert names[0] == "prompt" and names.index("init_image") > names.index("model")
    for bad in ({"strength": True}, {"strength": "0.5"}, {"mask_blur": "3"}):
        with pytest.raises(ValidationError) as info:
            GenerationRequest(prompt="x", init_image=init_png, **bad)
        assert info.value.errors()[0]["loc"] == (next(iter(bad)),)


def test_generate_async_decodes_images_off_the_event_loop(engine, req, ok, decode, init_png, mask_png, monkeypatch):
    import asyncio
    import threading

    import core.img2img as img2img

    threads, original = [], img2img.decode_request_images

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(img2img, "decode_request_images", spy)
    r = req(seed=70, steps=2, init_image=init_png, mask_image=mask_png)

    async def main():
        return await engine.generate_async(r), threading.current_thread()

    out, loop_thread = asyncio.run(main())
    assert threads and threads[0] is not loop_thread
    assert np.array_equal(pixels(decode, ok(out)), pixels(decode, ok(engine.generate([r])[0])))
