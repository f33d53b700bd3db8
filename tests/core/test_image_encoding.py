"""Encoding: png / jpeg / webp at the right size; PNG carries A1111 `parameters` and an `sdserve` JSON chunk."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from core.encoding import a1111_parameters, encode_image, read_png_parameters, to_uint8
from core.schemas import MEDIA_TYPES

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_engine_formats_decode_to_requested_size(engine, req, ok, fmt):
    out = ok(engine.generate([req(seed=5, width=96, height=64, output_format=fmt)])[0])
    image = out.images[0]
    assert out.output_format == fmt and image.media_type == MEDIA_TYPES[fmt]
    with Image.open(io.BytesIO(image.data)) as img:
        assert img.format == PIL_FORMATS[fmt] and img.size == (96, 64) and img.mode == "RGB"


def test_png_metadata(engine, req, ok):
    out = ok(engine.generate([req(prompt="a fox", negative_prompt="blur", seed=123, steps=3, num_images=2,
                                  scheduler="euler_a", guidance_scale=6.5)])[0])
    for i, image in enumerate(out.images):
        text = read_png_parameters(image.data)
        meta = json.loads(text["sdserve"])
        assert meta["seed"] == 123 + i and meta["steps"] == 3 and meta["scheduler"] == "euler_a"
        assert (meta["width"], meta["height"], meta["guidance_scale"]) == (64, 64, 6.5)
        assert meta["prompt"] == "a fox" and meta["negative_prompt"] == "blur" and meta["model"] == "tiny-sd"
        assert meta["note"] == out.note and "noise" in out.note
        lines = text["parameters"].split("\n")
        assert lines[0] == "a fox" and lines[1] == "Negative prompt: blur"
        assert lines[2].startswith("Steps: 3, Sampler: euler_a, CFG scale: 6.5, ")
        assert f"Seed: {123 + i}, Size: 64x64, Model: tiny-sd" in lines[2]


def test_jpeg_and_webp_carry_parameters_in_exif(engine, req, ok):
    for fmt in ("jpeg", "webp"):
        data = ok(engine.generate([req(seed=8, output_format=fmt)])[0]).images[0].data
        with Image.open(io.BytesIO(data)) as img:
            assert "Seed: 8" in img.getexif()[0x9286]


def test_result_fields_and_timings(engine, req, ok):
    out = ok(engine.generate([req(seed=1, steps=3)])[0])
    assert (out.width, out.height, out.steps, out.model, out.batch_size) == (64, 64, 3, "tiny-sd", 1)
    t = out.timings
    assert t.denoise_s > 0 and t.decode_s > 0 and t.encode_s > 0 and t.total_s >= t.denoise_s
    assert out.peak_vram_bytes is None  # CPU


def test_encode_is_deterministic_and_lossless_for_png():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    params = {"prompt": "p", "seed": 1, "steps": 2}
    data = encode_image(pixels, "png", params)
    assert data == encode_image(pixels, "png", params)
    with Image.open(io.BytesIO(data)) as img:
        assert np.array_equal(np.asarray(img), pixels)


def test_encode_without_params_and_unknown_format():
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    assert read_png_parameters(encode_image(pixels, "png")) == {}
    with pytest.raises(ValueError, match="png, jpeg, webp"):
        encode_image(pixels, "gif")


def test_to_uint8_clamps_and_zeroes_nan():
    out = to_uint8(np.array([[-0.5, 0.0, 0.5, 1.0, 2.0, np.nan, np.inf]]))
    assert out.tolist() == [[0, 0, 128, 255, 255, 0, 255]]


def test_a1111_parameters_without_negative_prompt():
    text = a1111_parameters({"prompt": "p", "steps": 2, "scheduler": "ddim", "guidance_scale": 7, "seed": 3,
                             "width": 64, "height": 72, "model": "m"})
    assert text == "p\nSteps: 2, Sampler: ddim, CFG scale: 7, Seed: 3, Size: 64x72, Model: m"


@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (500, 600)])  # 500x600 spans several deflate slices
def test_parallel_png_round_trips_pixels_and_unicode_prompt(shape):
    from core import encoding

    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    params = {"prompt": "café ✓ 東京", "seed": 3, "steps": 4}
    data = encoding.encode_png(pixels, params)
    assert data.count(b"IDAT") == 1
    if shape == (500, 600):
        assert pixels.nbytes > 2 * encoding.PNG_SLICE_BYTES  # the multi-slice path really ran
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # PIL checks every chunk's CRC and the zlib stream while decoding
        assert img.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(img.convert("RGB")), pixels)
    text = read_png_parameters(data)
    assert "café ✓ 東京" in text["parameters"] and json.loads(text["sdserve"]) == params


def test_parallel_png_bytes_do_not_depend_on_thread_count(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from core import encoding

    pixels = np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    many = encoding.encode_png(pixels)
    monkeypatch.setattr(encoding, "_png_pool", ThreadPoolExecutor(max_workers=1))
    assert encoding.encode_png(pixels) == many


def test_parallel_png_compresses_smooth_images():
    from core.encoding import encode_png

    ramp = np.tile(np.linspace(0, 255, 512).astype(np.uint8)[None, :, None], (512, 1, 3))
    assert len(encode_png(ramp)) < ramp.nbytes / 20
