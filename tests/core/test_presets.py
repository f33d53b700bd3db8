"""`preset: exact | fast | fastest` expands into optimization fields; fields written under optimization win."""
from __future__ import annotations

import pytest

from core.config import PRESETS, EngineConfig, OptimizationConfig, format_validation_error


def test_each_preset_adds_to_the_one_before():
    exact, fast, fastest = (EngineConfig(preset=p).optimization for p in ("exact", "fast", "fastest"))
    assert (exact.compile, exact.fuse_qkv, exact.channels_last, exact.sdpa_backend) == \
        ("reduce-overhead", True, True, "cudnn")
    assert exact.fp8 is False and exact.step_cache is None
    assert fast.fp8 == "static" and fast.step_cache is None
    assert fastest.fp8 == "static" and fastest.step_cache.interval == 3
    assert fast.model_dump(exclude={"fp8"}) == exact.model_dump(exclude={"fp8"})


def test_explicit_optimization_fields_override_the_preset_and_no_preset_changes_nothing():
    cfg = EngineConfig(preset="fastest", optimization={"compile": "none", "step_cache": None, "fp8": False})
    assert (cfg.optimization.compile, cfg.optimization.step_cache, cfg.optimization.fp8) == ("none", None, False)
    assert cfg.optimization.fuse_qkv is True  # what the config did not write comes from the preset
    # an OptimizationConfig object counts only the fields it was given
    obj = EngineConfig(preset="exact", optimization=OptimizationConfig(compile="default")).optimization
    assert obj.compile == "default" and obj.channels_last is True
    assert EngineConfig().optimization == OptimizationConfig()


def test_a_dumped_config_validates_back_to_itself_and_a_bad_preset_is_named():
    cfg = EngineConfig(preset="fast", optimization={"channels_last": False})
    assert EngineConfig.model_validate(cfg.model_dump()) == cfg
    with pytest.raises(ValueError) as err:
        EngineConfig(preset="fastest-please")
    assert format_validation_error(err.value).startswith("preset:")
    assert set(PRESETS) == {"exact", "fast", "fastest"}


def test_a_serving_config_takes_a_preset_per_model():
    from serving.config import ServingConfig

    cfg = ServingConfig.model_validate({"models": [
        {"engine": {"name": "a", "preset": "fastest"}},
        {"engine": {"name": "b", "preset": "exact", "optimization": {"compile": "none"}}}]})
    a, b = (m.engine.optimization for m in cfg.models)
    assert a.step_cache is not None and b.compile == "none" and b.fuse_qkv
