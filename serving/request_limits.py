"""Checking a request against its model's limits in the ingress, before anything is queued (async jobs).

The check is the model replica's own: `core.engine.Engine.resolve` on an engine that is never loaded (no weights,
no torch import), so a job is refused at submit exactly as /v1/generate refuses the same body.
"""
from __future__ import annotations

from functools import lru_cache

from core.config import EngineConfig
from core.schemas import GenerationError, GenerationRequest


@lru_cache(maxsize=64)
def _unloaded_engine(config_json: str):
    from core.engine import Engine

    return Engine(EngineConfig.model_validate_json(config_json))


def limits_error(engine: EngineConfig, req: GenerationRequest) -> GenerationError | None:
    """The GenerationError (kind 'validation', naming the field) the model would answer, or None."""
    try:
        _unloaded_engine(engine.model_dump_json()).resolve(req.model_copy(update={"model": engine.name}))
    except GenerationError as err:
        return err
    return None
