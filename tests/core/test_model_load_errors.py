"""Model-load failures are one typed line: which model, which source, what is wrong, what to change."""
from __future__ import annotations

import pickle

import pytest

from core.config import EngineConfig
from core.loading import ModelLoadError, check_source, load_pipeline


def config(source: str, **kw) -> EngineConfig:
    return EngineConfig(name="m1", source=source, device="cpu", **kw)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text.startswith("model 'm1' (source ")
    return text


def test_hub_offline_not_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        check_source(config("someorg/not-cached-model"))
    text = one_line(err)
    assert "not in the local cache" in text and "hub is off" in text and "local diffusers folder" in text


def test_hub_load_failure_is_one_line(monkeypatch):
    """The loader itself (what a replica runs) turns diffusers' OSError into the same line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(config("someorg/not-cached-model"), "cpu", None)
    assert "not in the local cache" in one_line(err) and err.value.__cause__ is None


@pytest.mark.parametrize("source, words", [
    ("/nonexistent/sd15", "local path /nonexistent/sd15 does not exist"),
    ("/nonexistent/model.safetensors", "does not exist"),
])
def test_missing_local_paths(source, words):
    with pytest.raises(ModelLoadError) as err:
        check_source(config(source))
    assert words in one_line(err)


def test_non_safetensors_files(tmp_path):
    other = tmp_path / "model.onnx"
    other.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="only .safetensors"):
        check_source(config(str(other)))
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError) as err:
        check_source(config(str(bad)))
    assert "not a readable .safetensors file" in one_line(err)


def test_wrong_family_single_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    f = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(f))
    with pytest.raises(ModelLoadError) as err:
        check_source(config(str(f), family="sdxl"))
    assert "checkpoint is sd15 but engine.family is sdxl" in one_line(err)


def test_wrong_family_folder(tiny_folders):
    with pytest.raises(ModelLoadError) as err:
        check_source(config(tiny_folders["tiny-sdxl"], family="sd15"))
    assert "checkpoint is sdxl" in one_line(err)


def test_error_survives_pickling_across_ray_workers():
    err = ModelLoadError("the hub is off", "m1", "org/x")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and (back.model, back.source, back.reason) == ("m1", "org/x", "the hub is off")
