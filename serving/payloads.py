"""JSON payloads of generation results, shared by the HTTP routes and the jobs runner.

The native API's JSON answer and a stored job result have one shape, built here; neither the jobs runner nor the
routes import each other for it. No Ray, no FastAPI imports.
"""
from __future__ import annotations

import base64
from typing import Any

from core.schemas import GenerationResult


def result_json(result: GenerationResult) -> dict[str, Any]:
    """The result with its images as base64 (`b64_json`, seed, media type) and the seeds listed."""
    data = result.model_dump(exclude={"images"})
    data["images"] = [{"b64_json": base64.b64encode(i.data).decode(), "seed": i.seed, "media_type": i.media_type}
                      for i in result.images]
    data["seeds"] = [i.seed for i in result.images]
    return data
