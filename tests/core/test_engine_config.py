"""EngineConfig: unknown keys and out-of-range values are errors naming the key (and the range); YAML loading."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.config import EMBEDDED_MODELS, EngineConfig, MemoryLevel, format_validation_error, load_engine_config


def error_text(**data) -> str:
    with pytest.raises(ValidationError) as info:
        EngineConfig.model_validate(data)
    return format_validation_error(info.value)


def test_defaults_are_valid():
    cfg = EngineConfig()
    assert cfg.source == "embedded:tiny-sd" and cfg.embedded_name == "tiny-sd" and cfg.is_noise_model
    assert cfg.memory.level is MemoryLevel.NONE


@pytest.mark.parametrize("data, key", [
    ({"bogus": 1}, "bogus"),
    ({"limits": {"max_stepz": 10}}, "limits.max_stepz"),
    ({"optimization": {"compile_mode": "default"}}, "optimization.compile_mode"),
    ({"memory": {"levle": "auto"}}, "memory.levle"),
    ({"defaults": {"sampler": "euler"}}, "defaults.sampler"),
])
def test_unknown_key_is_named(data, key):
    text = error_text(**data)
    assert key in text and "Extra inputs are not permitted" in text


@pytest.mark.parametrize("data, key, bound", [
    ({"limits": {"max_steps": 5000}}, "limits.max_steps", "1000"),
    ({"limits": {"max_steps": 0}}, "limits.max_steps", "1"),
    ({"limits": {"max_width": 32}}, "limits.max_width", "64"),
    ({"limits": {"max_batch_size": 0}}, "limits.max_batch_size", "1"),
    ({"memory": {"gpu_fraction": 1.5}}, "memory.gpu_fraction", "1"),
    ({"memory": {"vram_budget_gib": 0}}, "memory.vram_budget_gib", "0"),
    ({"optimization": {"warmup_steps": 99}}, "optimization.warmup_steps", "50"),
    ({"defaults": {"width": 100}}, "defaults.width", "multiple of 8"),
    ({"seed": -1}, "seed", "0"),
])
def test_out_of_range_names_key_and_bound(data, key, bound):
    text = error_text(**data)
    assert text.startswith(key + ":") or f"; {key}:" in text, text
    assert bound in text


@pytest.mark.parametrize("data, key, allowed", [
    ({"dtype": "fp64"}, "dtype", "'fp16'"),
    ({"device": "tpu"}, "device", "cuda"),
    ({"memory": {"level": "extreme"}}, "memory.level", "'balanced'"),
    ({"optimization": {"compile": "fast"}}, "optimization.compile", "'reduce-overhead'"),
])
def test_bad_choice_lists_allowed_values(data, key, allowed):
    text = error_text(**data)
    assert key in text and allowed in text


def test_defaults_must_fit_limits():
    text = error_text(limits={"max_width": 512}, defaults={"width": 1024})
    assert "defaults.width" in text and "limits.max_width" in text


def test_unknown_default_scheduler_lists_valid_names():
    text = error_text(scheduler="warp_drive")
    assert "scheduler" in text and "warp_drive" in text and "euler_a" in text and "dpmpp_2m" in text


def test_scheduler_name_is_normalised():
    assert EngineConfig(scheduler=" Euler_A ").scheduler == "euler_a"


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_embedded_sources(name):
    cfg = EngineConfig(source=f"embedded:{name}")
    assert cfg.embedded_name == name and cfg.is_noise_model


def test_unknown_embedded_source_lists_valid_ones():
    text = error_text(source="embedded:tiny-sd3")
    assert "source" in text and "embedded:tiny-sdxl" in text


def test_non_embedded_source_is_not_noise():
    cfg = EngineConfig(source="/models/sd15")
    assert cfg.embedded_name is None and not cfg.is_noise_model


def test_assignment_is_validated():
    cfg = EngineConfig()
    with pytest.raises(ValidationError):
        cfg.limits.max_steps = 0


def test_yaml_with_engine_wrapper(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("engine:\n  name: fox\n  scheduler: dpmpp_2m\n  limits:\n    max_steps: 50\n"
                    "  memory:\n    level: balanced\n")
    cfg = load_engine_config(path)
    assert (cfg.name, cfg.scheduler, cfg.limits.max_steps, cfg.memory.level) == (
        "fox", "dpmpp_2m", 50, MemoryLevel.BALANCED)


def test_bare_yaml_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("name: fox\ndevice: cpu\n")
    cfg = load_engine_config(path, source="embedded:tiny-sdxl", device=None)
    assert (cfg.name, cfg.device, cfg.source) == ("fox", "cpu", "embedded:tiny-sdxl")


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_engine_config(path) == EngineConfig(cache_dir=load_engine_config(path).cache_dir)


def test_yaml_unknown_key_is_named(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("engine:\n  limits:\n    max_pixel: 10\n")
    with pytest.raises(ValidationError) as info:
        load_engine_config(path)
    assert "limits.max_pixel" in format_validation_error(info.value)


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_engine_config(path)


@pytest.mark.parametrize("shape, key", [((65, 64, 1), "optimization.warmup_shapes.0.0"),
                                        ((64, 32, 1), "optimization.warmup_shapes.0.1"),
                                        ((64, 64, 0), "optimization.warmup_shapes.0.2")])
def test_warmup_shapes_are_bounded(shape, key):
    assert error_text(optimization={"warmup_shapes": [shape]}).startswith(key + ":")
