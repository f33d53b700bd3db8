"""OpenAI Images API `POST /v1/images/edits` (multipart): form fields -> GenerationRequest (img2img / inpainting).

OpenAI's conventions, kept so unmodified clients work: `image` (one file; the client sends `image[]` for a list,
and sdserve takes exactly one), `mask` a PNG whose transparent pixels (alpha 0) mark the area to edit, same size as
the image. sdserve's mask is the opposite encoding (an L image, white = repaint), so the mask's alpha is inverted
here. Without a mask, an image with transparent pixels is edited where it is transparent (as OpenAI's dall-e-2
does); an opaque image without a mask is repainted as a whole (img2img at `strength`).

Pure: no FastAPI, no Ray. Errors are OpenAIError 400s naming OpenAI's param (image, mask, n, size...).
"""
from __future__ import annotations

import io
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.image_fields import ImageInputLimits
from core.schemas import MAX_SEED, GenerationError, GenerationRequest
from serving.openai_api import OpenAIError, parse_size

IMAGE_PARTS = ("image", "image[]")
FILE_PARTS = IMAGE_PARTS + ("mask",)


class OpenAIEditRequest(BaseModel):
    """The text fields of an edits form (values arrive as strings: pydantic's lax mode reads "2" as 2)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=10_000, description="What the edited image shows.")
    model: str | None = Field(None, max_length=128, description="Model name (GET /v1/models); default model when "
                              "absent.")
    n: int = Field(1, ge=1, le=64, description="Number of images.")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' (multiples of 8) or 'auto' (the image's size).")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="b64_json (default); url "
                                                                  "needs a result store (400).")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Image encoding.")
    user: str | None = Field(None, max_length=256, description="End-user id (logged only).")
    # OpenAI's, accepted for compatibility and ignored.
    quality: str | None = None
    background: str | None = None
    input_fidelity: str | None = None
    output_compression: int | None = None
    partial_images: int | None = None
    stream: bool | None = None
    safety_identifier: str | None = None
    moderation: str | None = None
    # sdserve extensions.
    negative_prompt: str | None = Field(None, max_length=10_000, description="Extension: what to avoid.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Extension: seed of the first image.")
    steps: int | None = Field(None, ge=1, le=1000, description="Extension: denoising steps (before strength).")
    guidance_scale: float | None = Field(None, ge=0, le=50, allow_inf_nan=False, description="Extension: CFG.")
    scheduler: str | None = Field(None, max_length=64, description="Extension: scheduler name.")
    strength: float | None = Field(None, gt=0, le=1, description="Extension: how much is repainted (default: 1 "
                                   "inside a mask, the model's img2img default without one).")
    mask_blur: int | None = Field(None, ge=0, le=64, description="Extension: mask blur radius in pixels.")


def parse_edit_form(fields: dict[str, str]) -> OpenAIEditRequest:
    try:
        return OpenAIEditRequest.model_validate(fields)
    except ValidationError as err:
        e = err.errors()[0]
        param = str(e["loc"][0]) if e.get("loc") else None
        raise OpenAIError(400, f"{param}: {e['msg']}" if param else str(e["msg"]), param,
                          "unknown_parameter" if e.get("type") == "extra_forbidden" else "invalid_value") from None


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def edit_images(image: bytes, mask: bytes | None, limits: ImageInputLimits) -> tuple[bytes, bytes | None]:
    """(init image bytes, sdserve mask PNG or None) from OpenAI's image + optional alpha mask.

    Blocking (decodes): run it in a thread. Raises OpenAIError 400 naming `image` or `mask`.
    """
    from PIL import ImageChops

    from core.image_inputs import _has_alpha, decode_image, openai_mask_to_repaint

    try:
        img = decode_image(image, "image", limits, mode=None)
        if mask is not None:
            decoded = decode_image(mask, "mask", limits, mode=None)
            if decoded.size != img.size:
                raise GenerationError(f"mask: mask is {decoded.width}x{decoded.height} but image is "
                                      f"{img.width}x{img.height}; they must have the same size", "validation",
                                      "mask")
            return image, _png(openai_mask_to_repaint(decoded))
        if _has_alpha(img.image):
            alpha = img.image.convert("RGBA").getchannel("A")
            if alpha.getextrema()[0] < 255:  # some transparency: that is the area to edit
                return image, _png(ImageChops.invert(alpha))
        return image, None
    except GenerationError as err:
        raise OpenAIError(400, err.message, err.field, "invalid_image") from None


def to_generation_request(body: OpenAIEditRequest, image: bytes, mask_png: bytes | None) -> GenerationRequest:
    width, height = parse_size(body.size)
    fields: dict[str, Any] = {
        "prompt": body.prompt, "negative_prompt": body.negative_prompt, "width": width, "height": height,
        "steps": body.steps, "guidance_scale": body.guidance_scale, "scheduler": body.scheduler, "seed": body.seed,
        "num_images": body.n, "output_format": body.output_format or "png", "model": body.model,
        "init_image": image, "mask_image": mask_png, "mask_blur": body.mask_blur,
        # Inside OpenAI's mask the area is drawn anew (strength 1); without one, the model's img2img default.
        "strength": body.strength if body.strength is not None else (1.0 if mask_png is not None else None)}
    try:
        return GenerationRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        e = err.errors()[0]
        field = str(e["loc"][0]) if e.get("loc") else None
        param = EDIT_PARAM.get(field, field)
        raise OpenAIError(400, f"{param}: {e['msg']}", param, "invalid_value") from None


# Our field -> OpenAI's edits param.
EDIT_PARAM = {"num_images": "n", "width": "size", "height": "size", "init_image": "image", "mask_image": "mask"}
