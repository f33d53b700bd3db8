"""The base of every config/schema model. Its own module so core/image_fields.py (the request's image fields and
their limits) and core/config.py (which holds those limits in EngineConfig) both build on it without a cycle."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base for every config/schema model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
