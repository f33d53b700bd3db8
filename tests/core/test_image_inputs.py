"""Input images: every bad-image case is refused before its pixels are decoded, naming the request's field."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core.image_fields import ControlInput, ImageInputFields, ImageInputLimits, UriAllowlist
from core.image_inputs import ANY_URI, NO_URIS, UriPolicy, classify_source, decode_image, decode_request_images, \
    openai_mask_to_repaint, output_size, repaint_mask
from core.schemas import GenerationError

LIMITS = ImageInputLimits()


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    chans = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, chans), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if chans == 1 else arr, mode)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT: a header that costs nothing to send."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def refused(source, field="init_image", limits=LIMITS, uris=NO_URIS, **kw) -> GenerationError:
    with pytest.raises(GenerationError) as info:
        decode_image(source, field, limits, uris, **kw)
    err = info.value
    assert err.kind == "validation" and err.field == field
    assert field in err.message  # the message names the field too (clients often show only the message)
    return err


# ------------------------------------------------------------------------------------------------ accepted inputs

@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_png_jpeg_webp_decode_from_base64_and_bytes(fmt, pil):
    img = noise(96, 72)
    data = encode(img, pil, **({"lossless": True} if pil == "WEBP" else {}))
    for source in (data, base64.b64encode(data).decode()):
        out = decode_image(source, "init_image", LIMITS)
        assert (out.format, out.width, out.height, out.image.mode) == (fmt, 96, 72, "RGB")
        assert out.array().shape == (72, 96, 3)
        assert out.num_bytes == len(data)
    if fmt != "jpeg":  # lossless: the very pixels come back
        assert np.array_equal(out.array(), np.asarray(img))


def test_data_url_and_wrapped_base64_are_accepted():
    data = encode(noise(64, 64))
    b64 = base64.b64encode(data).decode()
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)) + "\n"  # MIME-style line wrapping
    a = decode_image(f"data:image/png;base64,{b64}", "init_image", LIMITS)
    b = decode_image(wrapped, "init_image", LIMITS)
    assert a.sha256 == b.sha256 and np.array_equal(a.array(), b.array())


def test_content_hash_follows_the_bytes():
    one, two = encode(noise(64, 64, seed=1)), encode(noise(64, 64, seed=2))
    assert decode_image(one, "init_image", LIMITS).sha256 == decode_image(one, "x", LIMITS).sha256
    assert decode_image(one, "init_image", LIMITS).sha256 != decode_image(two, "init_image", LIMITS).sha256


def test_format_is_sniffed_from_the_bytes_not_the_name(tmp_path):
    path = tmp_path / "photo.jpg"  # a PNG under a JPEG name
    path.write_bytes(encode(noise(64, 64)))
    out = decode_image(path.as_uri(), "init_image", LIMITS, ANY_URI)
    assert out.format == "png"


def test_transparent_pixels_become_white_in_rgb():
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[..., 0] = 200  # red hidden under alpha 0
    out = decode_image(encode(Image.fromarray(arr, "RGBA")), "control.0.image", LIMITS)
    assert out.image.mode == "RGB" and out.array()[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    depth = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0 .. 65520
    out = decode_image(encode(Image.fromarray(depth)), "control.0.image", LIMITS, mode="L")
    px = out.array()
    assert px.dtype == np.uint8 and px[0, 0] == 0 and px[-1, -1] >= 254 and 120 <= px[32, 0] <= 135


# ------------------------------------------------------------------------------------------------ refused inputs

def test_one_by_one_is_refused():
    err = refused(encode(noise(1, 1)))
    assert "1x1" in err.message and "at least 64" in err.message


def test_huge_header_is_refused_without_allocating():
    # 20000x20000: PIL itself calls it a decompression bomb (above twice MAX_IMAGE_PIXELS) inside Image.open.
    err = refused(png_header_only(20000, 20000), field="mask_image", mode="L")
    assert str(LIMITS.max_pixels) in err.message


def test_decompression_bomb_warning_range_is_refused():
    # 12000x12000 = 144M pixels: PIL only warns (above 89M, below 179M); the warning is turned into a refusal.
    err = refused(png_header_only(12000, 12000), field="control.1.image")
    assert "pixels" in err.message


def test_pixels_above_our_limit_are_refused_from_the_header():
    # Below anything PIL minds: our own max_pixels decides, before the (absent) pixel data is read.
    limits = ImageInputLimits(max_pixels=128 * 128)
    err = refused(png_header_only(200, 200), limits=limits)
    assert "200x200" in err.message and "16384" in err.message
    err = refused(png_header_only(9000, 64), limits=ImageInputLimits(max_side=8192))
    assert "at most 8192" in err.message


def test_a_real_bomb_is_refused_at_the_header():
    # A genuinely decodable 4096x4096 black PNG is a few KiB; with a 1024^2 pixel limit it must never be decoded.
    data = encode(Image.new("L", (4096, 4096)))
    assert len(data) < 100_000
    err = refused(data, limits=ImageInputLimits(max_pixels=1024 * 1024))
    assert "4096x4096" in err.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_refused(fmt):
    data = encode(noise(128, 128), fmt)
    err = refused(data[: len(data) // 2])
    assert "truncated" in err.message or "corrupt" in err.message


@pytest.mark.parametrize("fmt,name", [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_other_formats_are_refused_by_name(fmt, name):
    err = refused(encode(noise(64, 64), fmt), field="control.0.image")
    assert name in err.message and "PNG, JPEG, WebP" in err.message


def test_garbage_bytes_are_refused():
    err = refused(b"hello, this is not an image at all")
    assert "not a recognised image" in err.message


@pytest.mark.parametrize("bad", ["not base64 at all!!", "data:image/png,rawnotbase64", "QUJD*", "===="])
def test_bad_base64_and_data_urls_are_refused(bad):
    err = refused(bad, field="mask_image")
    assert "base64" in err.message or "data: URL" in err.message or "empty" in err.message


def test_a_bare_path_is_not_mistaken_for_base64():
    assert "file:///" in refused("/data/in.png").message


def test_too_many_bytes_is_refused_before_decoding_base64():
    limits = ImageInputLimits(max_bytes=1024)
    err = refused("A" * 4000, limits=limits)  # ~3000 bytes claimed by the length alone
    assert "1024 bytes" in err.message
    err = refused(encode(noise(64, 64)), limits=limits)  # raw bytes over the limit
    assert "more than the limit" in err.message


def test_uri_refused_without_an_allowlist(tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(encode(noise(64, 64)))
    err = refused(path.as_uri(), field="init_image")
    assert "image_inputs.uri_allowlist" in err.message  # names the config field that would allow it
    err = refused("s3://bucket/key.png", field="control.0.image")
    assert "not accepted" in err.message


def test_allowlisted_file_uri_is_read_and_others_refused(tmp_path):
    (tmp_path / "ok").mkdir()
    good = tmp_path / "ok" / "in.png"
    good.write_bytes(encode(noise(80, 64)))
    other = tmp_path / "ok-not" / "in.png"
    other.parent.mkdir()
    other.write_bytes(good.read_bytes())
    policy = UriPolicy(prefixes=((tmp_path / "ok").as_uri() + "/",))
    out = decode_image(good.as_uri(), "init_image", LIMITS, policy)
    assert out.size == (80, 64)
    assert "not under an allowed prefix" in refused(other.as_uri(), uris=policy).message  # a sibling directory
    sneaky = (tmp_path / "ok").as_uri() + "/../ok-not/in.png"
    assert "'..'" in refused(sneaky, uris=policy).message
    assert "no such file" in refused((tmp_path / "ok").as_uri() + "/missing.png", uris=policy).message


def test_allowlist_config_requires_directory_prefixes():
    assert UriAllowlist(prefixes=["s3://bucket/in/"]).prefixes == ["s3://bucket/in/"]
    for bad in ["s3://bucket/in", "/local/path/", "file:///a/../b/"]:
        with pytest.raises(ValueError):
            UriAllowlist(prefixes=[bad])


def test_classify_source():
    assert classify_source(b"\x89PNG") == "bytes"
    assert classify_source("data:image/png;base64,AAAA") == "data_url"
    assert classify_source("s3://b/k.png") == "uri" and classify_source("file:///x.png") == "uri"
    assert classify_source("iVBORw0KGgo=") == "base64"


# ------------------------------------------------------------------------------------------------ whole request

def test_request_images_name_each_field_and_check_mask_size():
    init, mask = encode(noise(96, 64)), encode(noise(96, 64, "L"))
    out = decode_request_images(init, mask, [encode(noise(64, 64))], LIMITS)
    assert out.init.size == (96, 64) and out.mask.image.mode == "L" and out.controls[0].field == "control.0.image"
    with pytest.raises(GenerationError) as info:
        decode_request_images(init, encode(noise(64, 64, "L")), [], LIMITS)
    assert info.value.field == "mask_image" and "64x64" in info.value.message and "96x64" in info.value.message
    with pytest.raises(GenerationError) as info:
        decode_request_images(init, None, [encode(noise(64, 64)), encode(noise(1, 1))], LIMITS)
    assert info.value.field == "control.1.image"


def test_output_size_follows_the_init_image_rounded_down():
    assert output_size((517, 389), None, None) == (512, 384)
    assert output_size((517, 389), 256, 128) == (256, 128)
    assert output_size((1000, 500), 512, None) == (512, 256)  # the other side keeps the aspect ratio
    assert output_size((1000, 500), None, 200) == (400, 200)
    assert output_size(None, None, None) == (None, None)
    assert output_size(None, 640, None) == (640, None)


def test_repaint_mask_and_blur():
    arr = np.zeros((64, 64), np.uint8)
    arr[:, 32:] = 255
    mask = repaint_mask(Image.fromarray(arr, "L").convert("RGB"))
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), arr)
    blurred = np.asarray(repaint_mask(Image.fromarray(arr, "L"), blur_px=4))
    assert 0 < blurred[32, 32] < 255 and blurred[32, 0] == 0 and blurred[32, 63] == 255


def test_openai_mask_transparent_means_repaint():
    arr = np.full((64, 64, 4), 255, np.uint8)
    arr[:32, :, 3] = 0  # top half transparent: OpenAI's "edit here"
    decoded = decode_image(encode(Image.fromarray(arr, "RGBA")), "mask", LIMITS, mode=None)
    ours = np.asarray(openai_mask_to_repaint(decoded))
    assert ours[:32].min() == 255 and ours[32:].max() == 0
    opaque = decode_image(encode(noise(64, 64)), "mask", LIMITS, mode=None)
    with pytest.raises(GenerationError) as info:
        openai_mask_to_repaint(opaque)
    assert info.value.field == "mask" and "alpha" in info.value.message


# ------------------------------------------------------------------------------------------------ request fields

def test_image_fields_validate_and_round_trip_bytes_through_json():
    data = encode(noise(64, 64))
    fields = ImageInputFields(init_image=data, strength=0.6, mask_image=data,
                              control=[{"model": "pose", "image": "s3://b/p.png", "scale": 0.5}])
    again = ImageInputFields.model_validate(fields.model_dump(mode="json"))
    # bytes come back as base64 text, which decodes to the same image
    assert decode_image(again.init_image, "init_image", LIMITS).sha256 == \
        decode_image(data, "init_image", LIMITS).sha256
    assert again.control[0].scale == 0.5
    for bad, field in [({"strength": 0.5}, "strength"), ({"mask_image": "AAAA"}, "mask_image"),
                       ({"init_image": "AAAA", "strength": 0}, "strength"),
                       ({"init_image": "AAAA", "unknown": 1}, "unknown")]:
        with pytest.raises(ValueError) as info:
            ImageInputFields(**bad)
        assert info.value.errors()[0]["loc"][0] == field
    with pytest.raises(ValueError) as info:
        ControlInput(model="pose", image="AAAA", start=0.8, end=0.2)
    assert info.value.errors()[0]["loc"] == ("end",)


def test_importing_the_image_modules_is_cheap():
    from tests.import_probe import heavy_imports

    assert heavy_imports(["core.image_fields", "core.image_inputs", "serving.config"],
                         ("PIL", "torch", "diffusers", "ray", "fsspec")) == []


def test_generation_request_carries_the_image_fields():
    from core.schemas import GenerationRequest as WithImages

    assert issubclass(WithImages, ImageInputFields)
    data = encode(noise(64, 64))
    req = WithImages(prompt="a fox", init_image=data, strength=0.5, steps=4)
    again = WithImages.model_validate(req.model_dump(mode="json"))  # what jobs store and read back
    assert again.prompt == "a fox" and again.strength == 0.5 and again.mask_blur == 4
    assert decode_image(again.init_image, "init_image", LIMITS).sha256 == decode_image(data, "x", LIMITS).sha256
    with pytest.raises(ValueError) as info:
        WithImages(prompt="a fox", strength=0.5)
    assert info.value.errors()[0]["loc"] == ("strength",)
