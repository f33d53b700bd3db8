"""Small input images for the HTTP/API tests of issue 19 (good ones and each bad-image case)."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int = 64, h: int = 64, mode: str = "RGB", seed: int = 0) -> Image.Image:
    chans = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, chans), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if chans == 1 else arr, mode)


def png(w: int = 64, h: int = 64, mode: str = "RGB", seed: int = 0) -> bytes:
    return encode(noise(w, h, mode, seed))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT: a bomb's header that costs nothing to send."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def half_mask(w: int = 64, h: int = 64) -> bytes:
    """White (repaint) right half, black left half."""
    arr = np.zeros((h, w), np.uint8)
    arr[:, w // 2:] = 255
    return encode(Image.fromarray(arr, "L"))


def alpha_mask(w: int = 64, h: int = 64) -> bytes:
    """OpenAI's mask convention: transparent (alpha 0) right half = edit, opaque left half = keep."""
    arr = np.full((h, w, 4), 255, np.uint8)
    arr[:, w // 2:, 3] = 0
    return encode(Image.fromarray(arr, "RGBA"))


def bad_images() -> dict[str, bytes | str]:
    """Each bad-image case of issue 19, as what a client would send in init_image."""
    good = png()
    gif = encode(noise(), "GIF")
    return {"bomb": png_header_only(30000, 30000), "truncated": good[: len(good) // 2],
            "tiny": png(1, 1), "huge": png_header_only(20000, 20000), "gif": gif, "bad_base64": "not base64 !!"}
