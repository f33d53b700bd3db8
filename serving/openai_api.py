"""OpenAI Images API compatibility: request schema, translation to GenerationRequest, response and error shapes.

Fields of OpenAI's API that have no meaning here (quality, style, background, moderation...) are accepted and
ignored so that unmodified clients work; unknown fields are rejected like OpenAI does (400).
"""
from __future__ import annotations

import base64
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from core.schemas import MAX_SEED, GenerationRequest, GenerationResult, LoraRef

SIZE_RE = re.compile(r"(\d{2,5})x(\d{2,5})")  # used with fullmatch: "64x64\n" is not a size


class OpenAIImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=10_000, description="What to draw.")
    model: str | None = Field(None, description="Model name (GET /v1/models); the default model when absent.")
    n: int = Field(1, ge=1, le=64, description="Number of images.")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' (multiples of 8) or 'auto' (model default).")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="b64_json (default). url needs "
                                                                  "a result store.")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Image encoding.")
    user: str | None = Field(None, max_length=256, description="End-user id (logged, not used otherwise).")
    # Accepted for compatibility, ignored.
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    stream: StrictBool | None = None
    partial_images: int | None = None
    # sdserve extensions.
    negative_prompt: str | None = Field(None, max_length=10_000, description="Extension: what to avoid.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Extension: seed of the first image.")
    steps: int | None = Field(None, ge=1, le=1000, description="Extension: denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, le=50, allow_inf_nan=False, description="Extension: CFG scale.")
    scheduler: str | None = Field(None, max_length=64, description="Extension: scheduler name.")
    loras: list[LoraRef] | None = Field(None, max_length=8, description="Extension: LoRAs [{name, weight}] "
                                        "(GET /v1/loras); `<lora:name:weight>` in the prompt works too.")

    @field_validator("n", "seed", "steps", "guidance_scale", "output_compression", "partial_images", mode="before")
    @classmethod
    def _strict_number(cls, value: Any) -> Any:
        # The same rule as GenerationRequest: `n: true` is not 1.
        return GenerationRequest._strict_number(value)


class OpenAIError(Exception):
    """Rendered as {"error": {message, type, param, code}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    m = SIZE_RE.fullmatch(size)
    if not m:
        raise OpenAIError(400, f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {size!r}", "size",
                          "invalid_size")
    return int(m.group(1)), int(m.group(2))


def to_generation_request(body: OpenAIImageRequest) -> GenerationRequest:
    """Translate; schema violations become OpenAI 400s naming the OpenAI field (n, size...)."""
    from pydantic import ValidationError

    width, height = parse_size(body.size)
    fields = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "width": width, "height": height,
              "steps": body.steps, "guidance_scale": body.guidance_scale, "scheduler": body.scheduler,
              "seed": body.seed, "num_images": body.n, "output_format": body.output_format or "png",
              "model": body.model, "loras": body.loras}
    try:
        return GenerationRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        e = err.errors()[0]
        field = str(e["loc"][0]) if e.get("loc") else None
        param = {"num_images": "n", "width": "size", "height": "size"}.get(field, field)
        raise OpenAIError(400, f"{param}: {e['msg']}", param, "invalid_value") from None


OPENAI_PARAM = {"num_images": "n", "width": "size", "height": "size", "init_image": "image", "mask_image": "mask"}


def openai_message(message: str, field: str | None) -> str:
    """A native error message for an OpenAI route: the field named as OpenAI clients know it ("n", not
    "num_images"); messages name their field first ("num_images: must be <= 8 ...")."""
    param = OPENAI_PARAM.get(field or "")
    if param and message.startswith(f"{field}:"):
        return f"{param}:{message[len(field) + 1:]}"
    return message


def invalid_json_message(error: dict[str, Any]) -> str:
    """FastAPI's json_invalid error as a sentence (its loc holds a character offset, not a field)."""
    ctx = error.get("ctx") or {}
    where = error.get("loc", ())[-1] if error.get("loc") else None
    detail = ctx.get("error") or error.get("msg") or "JSON decode error"
    at = f" at character {where}" if isinstance(where, int) else ""
    return f"request body is not valid JSON: {detail}{at}"


def images_response(result: GenerationResult) -> dict[str, Any]:
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(img.data).decode(), "revised_prompt": None, "seed": img.seed}
                 for img in result.images],
        "output_format": result.output_format,
        "size": f"{result.width}x{result.height}",
        "model": result.model,
    }


def models_response(models: list[dict[str, Any]], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": m["id"], "object": "model", "created": created, "owned_by": "sdserve",
                                        **{k: v for k, v in m.items() if k != "id"}} for m in models]}
