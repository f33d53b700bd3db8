"""Loading: saved diffusers folders, family detection, single .safetensors files; pickle checkpoints refused."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from core.embedded import build_pipeline
from core.engine import Engine
from core.loading import ModelLoadError, family_of_folder, family_of_single_file, source_kind

SIZE = {"width": 64, "height": 64, "steps": 2, "guidance_scale": 5.0}  # a saved folder gets the sd15 defaults


@pytest.fixture(scope="module")
def saved_sd(tmp_path_factory) -> str:
    """tiny-sd saved by the test itself, like a user's local diffusers folder."""
    path = tmp_path_factory.mktemp("my-sd15")
    build_pipeline("tiny-sd", seed=0).save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def folder_engine(saved_sd, make_config):
    return Engine(make_config(name="my-sd15", source=saved_sd)).load()


def test_folder_loads_as_sd15_and_generates(folder_engine, req, ok):
    assert folder_engine.family == "sd15" and folder_engine.note is None  # real source: no noise note
    out = ok(folder_engine.generate([req(seed=1, **SIZE)])[0])
    assert out.model == "my-sd15" and out.note is None


def test_folder_uses_family_defaults(folder_engine):
    from core.schemas import GenerationRequest

    r = folder_engine.resolve(GenerationRequest(prompt="a fox"))
    assert (r.width, r.height, r.steps, r.guidance_scale) == (512, 512, 30, 7.5)


def test_folder_matches_embedded_model(folder_engine, engine, req, ok, decode):
    """Same weights through the same from_pretrained path: the same pixels."""
    a = ok(folder_engine.generate([req(seed=5, **SIZE)])[0]).images[0].data
    b = ok(engine.generate([req(seed=5, **SIZE)])[0]).images[0].data
    assert np.array_equal(decode(a), decode(b))


def test_tiny_sdxl_folder_detected_and_generates(tiny_folders, make_config, req, ok):
    assert family_of_folder(Path(tiny_folders["tiny-sdxl"])) == "sdxl"
    eng = Engine(make_config(name="my-xl", source=tiny_folders["tiny-sdxl"])).load()
    assert eng.family == "sdxl" and type(eng.pipe).__name__ == "StableDiffusionXLPipeline"
    out = ok(eng.generate([req(seed=1, width=64, height=72, steps=2)])[0])
    assert (out.width, out.height) == (64, 72)


def test_embedded_tiny_sdxl_generates(make_config, req, ok, decode):
    eng = Engine(make_config(name="xl", source="embedded:tiny-sdxl")).load()
    outs = [ok(o) for o in eng.generate([req(seed=2), req(seed=3, negative_prompt="blur")])]
    assert eng.family == "sdxl" and outs[0].batch_size == 2
    alone = ok(eng.generate([req(seed=2)])[0])
    assert np.abs(decode(alone.images[0].data) - decode(outs[0].images[0].data)).max() <= 2


def test_sd21_detected_from_unet_config(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1024}))
    assert family_of_folder(tmp_path) == "sd21"


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth", ".pkl", ".CKPT"])
def test_pickle_checkpoints_refused_without_unpickling(tmp_path, make_config, suffix):
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = tmp_path / f"model{suffix}"
    ckpt.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelLoadError, match="pickle"):
        Engine(make_config(source=str(ckpt))).load()
    assert not marker.exists()


@pytest.mark.parametrize("source, match", [
    ("/nonexistent/model.safetensors", "does not exist"),
    ("not a source", "not an embedded model"),
])
def test_bad_sources(source, match):
    with pytest.raises(ModelLoadError, match=match):
        source_kind(source)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        source_kind(str(tmp_path))


def test_source_kinds(tmp_path, saved_sd):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"")
    assert source_kind(str(f)) == "single_file" and source_kind(saved_sd) == "folder"
    assert source_kind("stabilityai/sdxl-turbo") == "hub" and source_kind("embedded:tiny-sd") == "embedded"


def test_unknown_single_file_is_rejected(tmp_path):
    import torch
    from safetensors.torch import save_file

    f = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2)}, str(f))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        family_of_single_file(f)


def test_weights_go_through_host_memory_off_cuda():
    from core.loading import direct_device_map

    assert direct_device_map("cpu") is None  # on CUDA, NONE-level engines read straight into VRAM ("cuda")
