"""The one request/result schema, used by HTTP, Python handles and Parquet rows alike.

Fields left out (None) are filled from the model's defaults by `Engine.resolve`; the engine's limits
(max pixels, steps, images) are checked there too, because they are per-model configuration.
"""
from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, field_validator

from core.config import Strict
from core.image_fields import ImageInputFields

MAX_SEED = 2**32 - 1  # A1111/ComfyUI use 32-bit seeds; also exact in JSON and Parquet int64.
OutputFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


MAX_LORA_WEIGHT = 4.0
LORA_NAME_PATTERN = r"^[^<>:\\]+$"  # anything a file name and the <lora:name:weight> syntax can hold


class LoraRef(Strict):
    name: str = Field(..., min_length=1, max_length=256, pattern=LORA_NAME_PATTERN, description="LoRA name: its "
                      "file name in the model's LoRA folder without .safetensors (GET /v1/loras lists them).")
    weight: float = Field(1.0, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT, allow_inf_nan=False, description="Strength "
                          "(0: no effect; negative inverts it).")

    @field_validator("weight", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        if isinstance(value, (bool, str, bytes)):
            raise ValueError("must be a number, not a boolean or a string")
        return value


class TextToImageFields(Strict):
    """The text-to-image fields of GenerationRequest (listed first in its schema, CLI flags and docs)."""

    prompt: str = Field(..., min_length=1, max_length=10_000, description="What to draw (non-empty).")
    negative_prompt: str | None = Field(None, max_length=10_000, description="What to avoid; model default "
                                        "when absent.")
    width: int | None = Field(None, ge=64, le=8192, multiple_of=8, description="Width in pixels, a multiple "
                              "of 8 within the model's limits; model default when absent.")
    height: int | None = Field(None, ge=64, le=8192, multiple_of=8, description="Height in pixels, a "
                               "multiple of 8 within the model's limits; model default when absent.")
    steps: int | None = Field(None, ge=1, le=1000, description="Denoising steps (<= the model's max_steps).")
    guidance_scale: float | None = Field(None, ge=0, le=50, allow_inf_nan=False, description="Classifier-free "
                                         "guidance scale (a finite number); <= 1 turns CFG off.")
    scheduler: str | None = Field(None, max_length=64, description="Scheduler name (euler, euler_a, "
                                  "dpmpp_2m, dpmpp_2m_karras, unipc, ddim, lcm, ...); model default when absent.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the first image (image i uses "
                             "seed+i). Drawn at random and reported when absent.")
    num_images: int = Field(1, ge=1, le=64, description="Images to generate (<= the model's "
                            "max_images_per_request).")
    output_format: OutputFormat = Field("png", description="png | jpeg | webp.")
    model: str | None = Field(None, max_length=128, description="Model name; the deployment's default when "
                              "absent.")
    loras: list[LoraRef] = Field(default_factory=list, max_length=8, description="LoRA adapters for this request "
                                 "({name, weight}); `<lora:name:weight>` in the prompt adds to them (the tag is "
                                 "removed from the prompt). Requests with different LoRAs share UNet calls.")

    @field_validator("width", "height", "steps", "guidance_scale", "seed", "num_images", mode="before")
    @classmethod
    def _strict_number(cls, value: Any) -> Any:
        # `seed: true` is not 1 and `"5"` is not 5. Integral floats (5.0), JSON integers for float fields and numpy
        # scalars (Parquet rows) still pass; pydantic's Strict types would refuse the last two.
        if isinstance(value, (bool, str, bytes)) or type(value).__name__ == "bool_":
            raise ValueError("must be a number, not a boolean or a string")
        return value

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from core.schedulers import check_scheduler_name

        return check_scheduler_name(value)


class GenerationRequest(ImageInputFields, TextToImageFields):
    """One generation: text-to-image, or with the image fields (core.image_fields.ImageInputFields) img2img,
    inpainting and ControlNet. (Bases in this order: pydantic lists TextToImageFields' fields first.)"""

    @field_validator("strength", "mask_blur", mode="before")
    @classmethod
    def _strict_image_number(cls, value: Any) -> Any:
        return TextToImageFields._strict_number(value)  # as for the numbers above: true is not 1, "5" not 5


class Timings(Strict):
    queue_s: float = Field(0.0, ge=0, description="Waiting before the engine started this request.")
    denoise_s: float = Field(0.0, ge=0, description="Text encoding + denoising, from admission to the last step "
                             "(UNet calls are shared with the batch).")
    decode_s: float = Field(0.0, ge=0, description="VAE decode (calls shared by images finishing together).")
    encode_s: float = Field(0.0, ge=0, description="Image encoding of this request's images.")
    total_s: float = Field(0.0, ge=0, description="Wall time inside the engine for this request.")


class GeneratedImage(Strict):
    data: bytes = Field(..., description="Encoded image bytes.")
    seed: int = Field(..., ge=0, le=MAX_SEED, description="Seed that produced this image.")
    media_type: str = Field(..., description="MIME type of data.")


class GenerationResult(Strict):
    images: list[GeneratedImage] = Field(..., min_length=1, description="One entry per requested image.")
    width: int = Field(..., description="Width in pixels.")
    height: int = Field(..., description="Height in pixels.")
    steps: int = Field(..., description="Denoising steps requested (the schedule's length).")
    steps_run: int | None = Field(None, description="img2img/inpainting: denoising steps actually run, "
                                  "int(steps x strength) (the schedule's last ones); absent for text-to-image, "
                                  "which runs all `steps`.")
    guidance_scale: float = Field(..., description="CFG scale used.")
    scheduler: str = Field(..., description="Scheduler used.")
    model: str = Field(..., description="Model that made the images.")
    output_format: OutputFormat = Field(..., description="Encoding of images[].data.")
    batch_size: int = Field(..., ge=1, description="The most images that shared a UNet call with these.")
    timings: Timings = Field(default_factory=Timings, description="Stage timings.")
    peak_vram_bytes: int | None = Field(None, description="Peak CUDA memory allocated during the call.")
    note: str | None = Field(None, description="Caveats, e.g. 'random weights: images are noise'.")

    @property
    def seed(self) -> int:
        return self.images[0].seed


class ErrorKind(StrEnum):
    """Why a request failed. A StrEnum: members equal their strings, so JSON, Parquet rows, metric tags and
    comparisons with "oom" etc. see the plain value."""

    VALIDATION = "validation"  # bad request (4xx), naming the field
    CAPACITY = "capacity"  # valid, but cannot fit this replica's VRAM budget (4xx)
    OOM = "oom"  # ran out of GPU memory anyway (503, retry)
    CANCELLED = "cancelled"  # the caller cancelled it (409)
    INTERNAL = "internal"  # anything else (5xx)


class GenerationError(Exception):
    """A per-request failure; the engine returns it in place of a result and stays usable.

    kind: an ErrorKind (a plain string of one is accepted and converted; anything else is a ValueError).
    """

    def __init__(self, message: str, kind: ErrorKind | str = ErrorKind.INTERNAL, field: str | None = None):
        super().__init__(message)
        self.message, self.kind, self.field = message, ErrorKind(kind), field

    def __reduce__(self):  # picklable across Ray workers
        return (GenerationError, (self.message, self.kind, self.field))

    def to_dict(self) -> dict:
        return {"message": self.message, "kind": self.kind.value, "field": self.field}


class GenerationCancelled(GenerationError):
    def __init__(self, message: str = "cancelled", kind: ErrorKind | str = ErrorKind.CANCELLED,
                 field: str | None = None):
        super().__init__(message, kind, field)

    def __reduce__(self):
        return (GenerationCancelled, (self.message,))
