"""Image encoding (png / jpeg / webp) with generation parameters embedded.

PNG results carry an A1111-style `parameters` text chunk (readable by A1111/ComfyUI/civitai tools) and a
machine-readable `sdserve` JSON chunk.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from typing import Any

import numpy as np


def a1111_parameters(params: dict[str, Any]) -> str:
    lines = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(
        f"Steps: {params.get('steps')}, Sampler: {params.get('scheduler')}, CFG scale: {params.get('guidance_scale')}, "
        f"Seed: {params.get('seed')}, Size: {params.get('width')}x{params.get('height')}, Model: {params.get('model')}")
    return "\n".join(lines)


def encode_image(pixels: np.ndarray, fmt: str, params: dict[str, Any] | None = None, quality: int = 95) -> bytes:
    """Encode one HxWx3 uint8 array. Deterministic: same pixels and params give the same bytes."""
    from PIL import Image

    pixels = np.ascontiguousarray(pixels if pixels.dtype == np.uint8 else to_uint8(pixels))
    if fmt == "png":
        return encode_png(pixels, params)
    img = Image.fromarray(pixels, mode="RGB")
    buf = io.BytesIO()
    if fmt == "jpeg":
        exif = img.getexif()
        if params:
            exif[0x9286] = a1111_parameters(params)  # UserComment, as A1111 does for JPEG
        img.save(buf, format="JPEG", quality=quality, exif=exif)
    elif fmt == "webp":
        exif = img.getexif()
        if params:
            exif[0x9286] = a1111_parameters(params)
        img.save(buf, format="WEBP", quality=quality, exif=exif)
    else:
        raise ValueError(f"unknown output_format {fmt!r}; valid: png, jpeg, webp")
    return buf.getvalue()


# Parallel PNG: the rows are split into a fixed number of slices (by image size only, so the bytes never depend on
# the thread count); each slice is deflated on its own thread (zlib releases the GIL) and ended with a sync flush,
# so the concatenation is one valid zlib stream (pigz's method). PIL encodes on one thread with adaptive filters,
# a large share of an SDXL b1 request at 1024^2 (docs/benchmarks.md).
PNG_SLICE_BYTES = 1 << 18  # 512^2 RGB: 3 slices; 1024^2: 12
_png_pool = None


def _pool():
    global _png_pool
    if _png_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _png_pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="png")
    return _png_pool


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _text_chunk(key: str, value: str) -> bytes:
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:  # iTXt: UTF-8, uncompressed, no language tag
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def encode_png(pixels: np.ndarray, params: dict[str, Any] | None = None, level: int = 1) -> bytes:
    """HxWx3 uint8 -> PNG with the `parameters` and `sdserve` text chunks. Every row uses the Up filter (one
    vectorised subtraction; it compresses smooth images well), deflated in parallel slices."""
    h, w, c = pixels.shape
    rows = pixels.reshape(h, w * c)
    raw = np.empty((h, w * c + 1), np.uint8)
    raw[:, 0] = 2  # filter type Up (the first row's "above" is zeros)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 wrap-around is the PNG arithmetic
    data = raw.reshape(-1)
    row_bytes = raw.shape[1]
    per_slice = max(1, PNG_SLICE_BYTES // row_bytes) * row_bytes
    bounds = [(i, min(i + per_slice, data.size)) for i in range(0, data.size, per_slice)]

    def deflate(k: int) -> bytes:
        lo, hi = bounds[k]
        z = zlib.compressobj(level, zlib.DEFLATED, -15)
        out = z.compress(memoryview(data[lo:hi]))
        return out + z.flush(zlib.Z_FINISH if k == len(bounds) - 1 else zlib.Z_SYNC_FLUSH)

    parts = list(_pool().map(deflate, range(len(bounds)))) if len(bounds) > 1 else [deflate(0)]
    stream = b"\x78\x01" + b"".join(parts) + struct.pack(">I", zlib.adler32(memoryview(data)) & 0xFFFFFFFF)
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))]
    if params:
        out += [_text_chunk("parameters", a1111_parameters(params)),
                _text_chunk("sdserve", json.dumps(params, sort_keys=True))]
    out += [_chunk(b"IDAT", stream), _chunk(b"IEND", b"")]
    return b"".join(out)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float images in [0, 1] (any NaN from random weights -> 0) to uint8."""
    images = np.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def read_png_parameters(data: bytes) -> dict[str, str]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return dict(getattr(img, "text", {}) or {})
