"""core.checkpoint_export: diffusers -> original LDM layout, loaded back through diffusers' own single-file path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from core.checkpoint_export import ExportError, export_single_file, pipeline_to_ldm
from core.embedded import build_pipeline
from core.engine import Engine
from core.loading import ModelLoadError, family_of_single_file, load_pipeline

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def exported(tiny_folders, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("single-file")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    files = {}
    for name, cls in (("tiny-sd", StableDiffusionPipeline), ("tiny-sdxl", StableDiffusionXLPipeline)):
        pipe = cls.from_pretrained(tiny_folders[name])
        files[name] = export_single_file(pipe, out / f"{name}.safetensors")
    return files


def keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())


def test_sd15_layout(exported):
    names = set(keys(exported["tiny-sd"]))
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight",
                "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",  # down 0, resnet 0
                "model.diffusion_model.input_blocks.2.0.op.weight",  # down 0 downsampler
                "model.diffusion_model.input_blocks.3.1.proj_in.weight",  # down 1 attention
                "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.middle_block.2.emb_layers.1.weight",
                "model.diffusion_model.output_blocks.1.2.conv.weight",  # up 0 upsampler after its attention
                "model.diffusion_model.out.2.weight",
                "first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
                "first_stage_model.encoder.down.0.downsample.conv.weight", "first_stage_model.post_quant_conv.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert key in names, key
    assert not any(".resnets." in k or "to_out" in k and "first_stage" in k for k in names)


def test_vae_attention_is_conv_shaped(exported):
    with safe_open(str(exported["tiny-sd"]), framework="pt") as fh:
        assert fh.get_tensor("first_stage_model.decoder.mid.attn_1.proj_out.weight").ndim == 4
        assert fh.metadata()["sdserve.family"] == "sd15"


def test_sdxl_layout(exported):
    names = set(keys(exported["tiny-sdxl"]))
    for key in ("model.diffusion_model.label_emb.0.0.weight",
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.text_projection",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.bias",
                "conditioner.embedders.1.model.positional_embedding"):
        assert key in names, key


@pytest.mark.parametrize("name, family", [("tiny-sd", "sd15"), ("tiny-sdxl", "sdxl")])
def test_weights_round_trip_exactly(exported, tiny_folders, make_config, name, family):
    """diffusers' from_single_file (config from the saved folder, offline) restores every tensor bit for bit."""
    cfg = make_config(source=str(exported[name]), single_file_config=tiny_folders[name], local_files_only=True)
    loaded, got_family = load_pipeline(cfg, "cpu", torch.float32)
    assert got_family == family == family_of_single_file(exported[name])
    from diffusers import DiffusionPipeline

    original = DiffusionPipeline.from_pretrained(tiny_folders[name])
    for comp in COMPONENTS:
        if getattr(original, comp, None) is None:
            continue
        a, b = getattr(original, comp).state_dict(), getattr(loaded, comp).state_dict()
        assert set(a) == set(b), comp
        for k in a:
            assert torch.equal(a[k], b[k]), f"{comp}.{k}"


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_single_file_engine_matches_folder_engine(exported, tiny_folders, make_config, req, ok, decode, name):
    folder = Engine(make_config(name="m", source=tiny_folders[name])).load()
    single = Engine(make_config(name="m", source=str(exported[name]), single_file_config=tiny_folders[name],
                                local_files_only=True)).load()
    assert single.family == folder.family
    for scheduler in ("euler", "euler_a"):
        r = req(seed=31, width=64, height=64, steps=2, scheduler=scheduler)
        a, b = ok(folder.generate([r])[0]), ok(single.generate([r])[0])
        assert np.array_equal(decode(a.images[0].data), decode(b.images[0].data))
        assert a.images[0].data == b.images[0].data


def test_fp16_export_halves_the_file(tiny_folders, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_folders["tiny-sd"])
    full = export_single_file(pipe, tmp_path / "full.safetensors")
    half = export_single_file(pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    with safe_open(str(half), framework="pt") as fh:
        assert fh.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16


def test_offline_without_config_is_a_clear_error(exported, make_config):
    cfg = make_config(source=str(exported["tiny-sd"]), local_files_only=True)
    with pytest.raises(ModelLoadError, match="single_file_config"):
        load_pipeline(cfg, "cpu", torch.float32)


def test_refuses_other_suffixes_and_sd2(tiny_folders, tmp_path):
    pipe = build_pipeline("tiny-sd")
    with pytest.raises(ExportError, match="safetensors"):
        export_single_file(pipe, tmp_path / "model.ckpt")
    pipe.unet.register_to_config(cross_attention_dim=1024)  # what an SD2.x UNet says
    with pytest.raises(ExportError, match="SD2"):
        pipeline_to_ldm(pipe)


def test_unmappable_weights_are_an_error():
    from core.checkpoint_export import unet_to_ldm

    with pytest.raises(ExportError, match="to_qkv_extra"):
        unet_to_ldm({"to_qkv_extra.weight": torch.zeros(1)}, layers_per_block=1)
