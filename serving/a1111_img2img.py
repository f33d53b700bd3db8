"""A1111's img2img (`POST /sdapi/v1/img2img`): request schema and translation onto GenerationRequest's image fields.

Mapped: `init_images` (exactly one; base64 or a data: URL), `denoising_strength` -> strength, `mask` (white =
repaint, A1111's convention and sdserve's) with `inpainting_mask_invert`, `mask_blur` (or mask_blur_x/y: the
larger when they differ, reported in `info.sdserve_ignored`), `inpainting_fill` 0 (fill: the masked area is
filled with its blurred surroundings first, as A1111's masking.fill) and 1 (original); `resize_mode` 0 (just resize) and 1 (crop and resize) when width and height are
both given and differ from the init image's size. Refused with a 422 naming the field: several init images,
inpainting_fill 2/3 (latent noise / latent nothing), resize_mode 2/3, a latent_mask, an initial_noise_multiplier
other than 1. `inpaint_full_res` ("only masked") is accepted and ignored: sdserve inpaints the whole picture at its
full resolution; a request with a mask and inpaint_full_res true lists it in `info.sdserve_ignored`.

Pure (PIL, no FastAPI, no Ray); `prepare_images` decodes, so routes run it in a thread.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from core.image_fields import ImageInputLimits
from core.image_inputs import NO_URIS, UriPolicy
from serving.a1111 import A1111Error, A1111Request, ModelInfo, Txt2ImgPlan, to_generation_request

MAX_SOURCE_CHARS = 96 * 1024 * 1024


class Img2ImgRequest(A1111Request):
    """StableDiffusionImg2ImgProcessingAPI's fields: the shared ones plus the init image, mask and inpainting."""

    init_images: list[Annotated[str, Field(max_length=MAX_SOURCE_CHARS)]] | None = Field(None, max_length=16, description="The init image: exactly one, base64 "
                                          "(or a data: URL).")
    denoising_strength: float = Field(0.75, ge=0, le=1, description="How much of the image is repainted "
                                      "(0 < strength <= 1).")
    resize_mode: int = Field(0, ge=0, le=3, description="When width/height differ from the init image: 0 just "
                             "resize, 1 crop and resize; 2 and 3 are refused.")
    image_cfg_scale: float | None = Field(None, description="instruct-pix2pix only; ignored.")
    mask: str | None = Field(None, max_length=MAX_SOURCE_CHARS, description="Inpainting mask (base64): white = "
                             "repaint; the init image's size.")
    mask_blur_x: int = Field(4, ge=0, le=64, description="Mask blur (px); used when mask_blur is absent and "
                             "equals mask_blur_y.")
    mask_blur_y: int = Field(4, ge=0, le=64, description="Mask blur (px), see mask_blur_x.")
    mask_blur: int | None = Field(None, ge=0, le=64, description="Mask blur radius in pixels.")
    mask_round: bool = Field(True, description="Ignored.")
    inpainting_fill: int = Field(0, ge=0, le=3, description="Masked content: 0 fill, 1 original; 2 (latent noise) "
                                 "and 3 (latent nothing) are refused.")
    inpaint_full_res: bool = Field(True, description="'Only masked' inpainting: ignored (sdserve inpaints the "
                                   "whole picture).")
    inpaint_full_res_padding: int = Field(0, ge=0, le=1024, description="Ignored (see inpaint_full_res).")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: repaint the black area instead.")
    initial_noise_multiplier: float | None = Field(None, description="Only 1 (or absent) is supported.")
    latent_mask: str | None = Field(None, description="Not supported (must be empty).")
    include_init_images: bool = Field(False, description="Echo init_images and mask in `parameters`.")


# The img2img fields the translation uses (never reported as ignored).
MAPPED = frozenset({"init_images", "denoising_strength", "resize_mode", "mask", "mask_blur_x", "mask_blur_y",
                    "mask_blur", "inpainting_fill", "inpainting_mask_invert", "include_init_images",
                    "initial_noise_multiplier", "latent_mask", "inpaint_full_res"})


@dataclass(frozen=True)
class PreparedImages:
    init: str | bytes  # the client's own string when untouched (its content hash stays the cache key)
    mask: bytes | None  # L PNG, white = repaint
    ignored: tuple[str, ...]


def check_fields(body: Img2ImgRequest) -> int:
    """The refusals that need no pixels; returns the mask blur radius."""
    if not body.init_images:
        raise A1111Error("init_images", "init_images: one init image is required")
    if len(body.init_images) > 1:
        raise A1111Error("init_images", f"init_images: sdserve takes exactly one init image, got "
                                        f"{len(body.init_images)}")
    if body.denoising_strength <= 0:
        raise A1111Error("denoising_strength", "denoising_strength: must be > 0 (0 would return the init image)")
    if body.latent_mask:
        raise A1111Error("latent_mask", "latent_mask: a separate latent mask is not supported by sdserve")
    if body.initial_noise_multiplier not in (None, 1, 1.0):
        raise A1111Error("initial_noise_multiplier", "initial_noise_multiplier: only 1 is supported by sdserve")
    if body.mask is not None and body.inpainting_fill in (2, 3):
        name = {2: "latent noise", 3: "latent nothing"}[body.inpainting_fill]
        raise A1111Error("inpainting_fill", f"inpainting_fill: {body.inpainting_fill} ({name}) is not supported by "
                                            "sdserve; use 0 (fill) or 1 (original)")
    if body.resize_mode in (2, 3) and body.width is not None and body.height is not None:
        raise A1111Error("resize_mode", "resize_mode: only 0 (just resize) and 1 (crop and resize) are supported")
    if body.mask_blur is not None:
        return body.mask_blur
    # sdserve blurs evenly: uneven x/y blur uses the larger (and is reported in sdserve_ignored by prepare_images)
    return max(body.mask_blur_x, body.mask_blur_y)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def fill(image, mask):
    """A1111's masking.fill: the masked area painted with ever less blurred copies of its surroundings."""
    from PIL import Image, ImageFilter, ImageOps

    image_mod = Image.new("RGBA", image.size)
    image_masked = Image.new("RGBa", image.size)
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def prepare_images(body: Img2ImgRequest, limits: ImageInputLimits, uris: UriPolicy = NO_URIS) -> PreparedImages:
    """Decode, check and pre-process the init image and mask (GenerationError naming init_images.0 / mask)."""
    from PIL import Image, ImageChops, ImageOps

    from core.image_inputs import check_same_size, decode_image

    init = decode_image(body.init_images[0], "init_images.0", limits, uris)
    image, changed = init.image, False
    mask = decode_image(body.mask, "mask", limits, uris, mode="L") if body.mask is not None else None
    mask_img = None
    if mask is not None:
        check_same_size(mask, init)
        mask_img = ImageChops.invert(mask.image) if body.inpainting_mask_invert else mask.image
    target = (body.width, body.height)
    if None not in target and target != image.size:
        if body.resize_mode == 1:
            image = ImageOps.fit(image, target, Image.LANCZOS)
            mask_img = ImageOps.fit(mask_img, target, Image.LANCZOS) if mask_img is not None else None
        else:
            image = image.resize(target, Image.LANCZOS)
            mask_img = mask_img.resize(target, Image.LANCZOS) if mask_img is not None else None
        changed = True
    if mask_img is not None and body.inpainting_fill == 0:
        image, changed = fill(image, mask_img), True
    ignored = ("inpaint_full_res",) if mask is not None and body.inpaint_full_res else ()
    if mask is not None and body.mask_blur is None and body.mask_blur_x != body.mask_blur_y:
        ignored += ("mask_blur_x/mask_blur_y: blurred evenly by the larger",)
    return PreparedImages(_png(image) if changed else body.init_images[0],
                          _png(mask_img) if mask_img is not None else None, ignored)


def to_img2img_request(body: Img2ImgRequest, prepared: PreparedImages, blur: int, models: list[ModelInfo],
                       default_model: str) -> Txt2ImgPlan:
    fields: dict[str, Any] = {"init_image": prepared.init, "strength": body.denoising_strength,
                              "mask_image": prepared.mask, "mask_blur": blur if prepared.mask is not None else None}
    return to_generation_request(body, models, default_model, fields, MAPPED, prepared.ignored)
