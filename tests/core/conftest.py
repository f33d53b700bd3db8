"""Fixtures for the core tests: tiny embedded models on CPU, one engine per module."""
from __future__ import annotations

import io

import numpy as np
import pytest

from core.config import EngineConfig
from core.schemas import GenerationRequest


def cpu_config(cache_dir: str, **kw) -> EngineConfig:
    """CPU fp32, no warm-up (tests make their own calls)."""
    kw.setdefault("optimization", {"warmup_steps": 0})
    kw.setdefault("device", "cpu")
    return EngineConfig(cache_dir=cache_dir, **kw)


@pytest.fixture(scope="session")
def make_config(sdserve_cache_dir):
    return lambda **kw: cpu_config(sdserve_cache_dir, **kw)


@pytest.fixture(scope="module")
def engine(sdserve_cache_dir):
    """tiny-sd loaded once per module."""
    from core.engine import Engine

    return Engine(cpu_config(sdserve_cache_dir)).load()


@pytest.fixture(scope="session")
def tiny_folders(sdserve_cache_dir) -> dict[str, str]:
    """The embedded tiny models saved as diffusers folders (built once per session)."""
    from core.embedded import ensure_saved

    return {name: str(ensure_saved(name, sdserve_cache_dir)) for name in ("tiny-sd", "tiny-sdxl")}


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).astype(np.int16)  # int16: differences may be negative


def _request(**kw) -> GenerationRequest:
    kw.setdefault("prompt", "a red fox in the snow")
    kw.setdefault("steps", 2)
    return GenerationRequest(**kw)


def _ok(outcome):
    from core.schemas import GenerationError

    if isinstance(outcome, GenerationError):
        pytest.fail(f"generation failed: {outcome.kind}: {outcome.message}")
    return outcome


@pytest.fixture(scope="session")
def decode():
    """Encoded image bytes -> HxWx3 int16 pixels."""
    return _decode


@pytest.fixture(scope="session")
def req():
    """GenerationRequest factory with cheap defaults (2 steps)."""
    return _request


@pytest.fixture(scope="session")
def ok():
    """The result, or fail the test with the engine's error message."""
    return _ok
