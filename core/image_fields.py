"""Typed pieces of the image inputs (issue 19): the limits every decoder checks and the request fields, ready to
join GenerationRequest.

Pure pydantic: importing this module imports neither PIL nor torch. The decoding lives in core/image_inputs.py.

GenerationRequest inherits `ImageInputFields` (its validators come along); the engine decodes them with
`core.image_inputs.decode_request_images` when it resolves a request (core/img2img.py).
"""
from __future__ import annotations

import base64
from typing import Annotated, Literal, Union

from pydantic import Field, PlainSerializer, ValidationInfo, field_validator, model_validator

from core.strict import Strict

# An encoded image as a request carries it: a str (base64, a data: URL or an fsspec URI such as s3://b/k.png; which
# one is told by its shape, see core.image_inputs.classify_source) or raw bytes (multipart uploads, Parquet binary
# columns). Bytes serialize to base64 in JSON mode, so a request survives model_dump(mode="json") -> validate (jobs
# store requests as JSON) and comes back as a base64 str, which decodes to the same bytes.
MAX_SOURCE_CHARS = 96 * 1024 * 1024  # base64 of the largest allowed max_bytes (64 MiB) plus a data: header
ImageBytes = Annotated[bytes, Field(max_length=64 * 1024 * 1024),
                       PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str,
                                       when_used="json")]
ImageSource = Union[Annotated[str, Field(min_length=1, max_length=MAX_SOURCE_CHARS)], ImageBytes]


class ImageInputLimits(Strict):
    """Limits on every input image, checked before its pixels are decoded (bytes first, then the header's size)."""

    max_bytes: int = Field(20 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024,
                           description="Largest encoded image in bytes (after base64 decoding).")
    max_pixels: int = Field(4096 * 4096, ge=64 * 64, le=8192 * 8192,
                            description="Largest width x height, read from the file's header before decoding "
                                        "(a decompression bomb is refused here).")
    max_side: int = Field(8192, ge=64, le=16384, description="Largest width or height in pixels.")
    min_side: int = Field(64, ge=8, le=1024, description="Smallest width or height in pixels (a 1x1 image "
                          "carries nothing to condition on).")

    @model_validator(mode="after")
    def _ordered(self) -> "ImageInputLimits":
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} > max_side {self.max_side}")
        if self.min_side * self.min_side > self.max_pixels:
            raise ValueError(f"min_side {self.min_side}^2 exceeds max_pixels {self.max_pixels}")
        return self


class UriAllowlist(Strict):
    """Which fsspec URIs an HTTP request may name as an image (batch jobs read any URI their rows name)."""

    prefixes: list[Annotated[str, Field(min_length=4, max_length=1024)]] = Field(
        default_factory=list, max_length=64,
        description="URI prefixes an image field may start with, e.g. 's3://bucket/inputs/' or 'file:///data/'. "
                    "Each ends with '/', so 's3://b/x/' does not admit 's3://b/x-other/'. Empty: URIs are refused.")

    @field_validator("prefixes")
    @classmethod
    def _directory_prefixes(cls, prefixes: list[str]) -> list[str]:
        for p in prefixes:
            if "://" not in p or not p.endswith("/"):
                raise ValueError(f"{p!r}: a prefix is a URI with a scheme ending in '/' (e.g. 's3://bucket/in/')")
            if "/../" in p or "/./" in p:
                raise ValueError(f"{p!r}: a prefix must not contain '.' or '..' segments")
        return prefixes


class ControlInput(Strict):
    """One ControlNet conditioning of a request (`control` is a list of these)."""

    model: str = Field(..., min_length=1, max_length=128, description="ControlNet name (GET /v1/controlnets).")
    image: ImageSource = Field(..., description="Conditioning image (pose, depth, edges...): base64, data: URL, "
                               "bytes, or an allowed URI.")
    scale: float = Field(1.0, ge=0, le=5, description="conditioning_scale: how strongly it steers (0 = off).")
    start: float = Field(0.0, ge=0, le=1, description="Fraction of the denoising steps where it starts acting.")
    end: float = Field(1.0, ge=0, le=1, description="Fraction of the denoising steps where it stops acting.")
    preprocess: Literal["none", "canny"] = Field("none", description="'canny': compute an edge map from the "
                                                 "image in-process; 'none': the image is the map.")

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: float, info: ValidationInfo) -> float:
        start = info.data.get("start")
        if start is not None and start >= end:
            raise ValueError(f"end {end} must be > start {start}")
        return end


class ImageInputFields(Strict):
    """The image fields of GenerationRequest (img2img, inpainting, ControlNet), as a base class to inherit."""

    init_image: ImageSource | None = Field(None, description="img2img: the starting image (base64, data: URL, "
                                           "bytes or an allowed URI). The output has its size (rounded down to "
                                           "multiples of 8) unless width/height are given.")
    strength: float | None = Field(None, gt=0, le=1, description="img2img: how much of the denoising runs "
                                   "(1 = ignore the init image's content); needs init_image; default 0.75.")
    mask_image: ImageSource | None = Field(None, description="Inpainting: white = repaint, black = keep; same "
                                           "size as init_image; needs init_image.")
    mask_blur: int = Field(4, ge=0, le=64, description="Inpainting: Gaussian blur radius of the mask in pixels "
                           "(soft seam when pasting the kept pixels back).")
    control: list[ControlInput] = Field(default_factory=list, max_length=4,
                                        description="ControlNet conditionings, applied together.")

    # Field validators (not a model validator) so the error's loc names the field. init_image is declared first,
    # so info.data holds it when these run (absent there when init_image itself failed validation).
    @field_validator("strength", "mask_image")
    @classmethod
    def _needs_init_image(cls, value, info: ValidationInfo):
        if value is not None and "init_image" in info.data and info.data["init_image"] is None:
            what = "how much of init_image is repainted" if info.field_name == "strength" else \
                "which pixels of init_image are repainted"
            raise ValueError(f"{info.field_name} needs init_image (it says {what})")
        return value
