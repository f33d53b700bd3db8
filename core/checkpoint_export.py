"""Export a diffusers SD1.x / SDXL pipeline to one original-layout (LDM / A1111) `.safetensors` checkpoint.

The inverse of diffusers' `from_single_file` conversion: A1111, ComfyUI and civitai tools read the result, and
`core.loading` loads it back (with `single_file_config` pointing at a diffusers folder holding the configs).
Key names are derived from the state dicts by pattern, so any block count / layers_per_block works (the tiny
embedded models included). Only weights are exported: no EMA, no optimizer state.

Export from a freshly loaded pipeline: offloading hooks, fused QKV or fp8 storage change the state dicts.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# Diffusers ResnetBlock2D sub-module -> LDM ResBlock sub-module (UNet).
UNET_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                     "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP_LEVEL = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                  "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
# VAE attention: diffusers Attention -> LDM AttnBlock (1x1 convs, so weights get two trailing unit dims).
VAE_ATTN_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


class ExportError(ValueError):
    pass


def _rename_part(rest: str, parts: dict[str, str]) -> str:
    for old, new in parts.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_to_ldm(sd: dict, layers_per_block: int) -> dict:
    """Diffusers UNet2DConditionModel state dict -> LDM `model.diffusion_model.*` layout (unprefixed)."""
    if not isinstance(layers_per_block, int):
        raise ExportError(f"per-block layers_per_block {layers_per_block!r} has no LDM layout")
    span = layers_per_block + 1  # LDM input blocks per level: resnets + the downsampler (up: resnets only)
    up_has_attn = {int(m.group(2)) for k in sd if (m := _BLOCK.match(k)) and m.group(1) == "up"
                   and m.group(3) == "attentions"}
    out = {}
    for key, value in sd.items():
        top = next((p for p in UNET_TOP_LEVEL if key.startswith(p + ".")), None)
        if top is not None:
            out[UNET_TOP_LEVEL[top] + key[len(top):]] = value
            continue
        if m := _BLOCK.match(key):
            side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if kind == "resnets":
                rest = _rename_part(rest, UNET_RESNET_PARTS)
            if side == "down":
                if kind == "downsamplers":  # LDM Downsample keeps its conv as `op`
                    new = f"input_blocks.{(i + 1) * span}.0.{rest.replace('conv.', 'op.', 1)}"
                else:
                    new = f"input_blocks.{1 + i * span + j}.{0 if kind == 'resnets' else 1}.{rest}"
            elif kind == "upsamplers":  # the upsampler sits after the block's last resnet (and attention)
                new = f"output_blocks.{i * span + layers_per_block}.{2 if i in up_has_attn else 1}.{rest}"
            else:
                new = f"output_blocks.{i * span + j}.{0 if kind == 'resnets' else 1}.{rest}"
            out[new] = value
            continue
        if m := _MID.match(key):
            kind, j, rest = m.groups()
            if kind == "resnets":
                out[f"middle_block.{2 * int(j)}.{_rename_part(rest, UNET_RESNET_PARTS)}"] = value
            else:
                out[f"middle_block.1.{rest}"] = value
            continue
        raise ExportError(f"UNet weight {key!r} has no LDM equivalent (export a freshly loaded pipeline)")
    return out


def vae_to_ldm(sd: dict, num_blocks: int) -> dict:
    """Diffusers AutoencoderKL state dict -> LDM `first_stage_model.*` layout (unprefixed)."""
    out = {}
    for key, value in sd.items():
        coder, _, rest = key.partition(".")
        if coder not in ("encoder", "decoder"):  # quant_conv / post_quant_conv keep their names
            out[key] = value
            continue
        if m := _BLOCK.match(rest):
            side, i, kind, j, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
            level = i if side == "down" else num_blocks - 1 - i  # LDM numbers decoder levels bottom-up
            if kind == "resnets":
                new = f"{side}.{level}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{tail}"
        elif m := _MID.match(rest):
            kind, j, tail = m.groups()
            if kind == "resnets":
                new = f"mid.block_{int(j) + 1}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"mid.attn_1.{_rename_part(tail, VAE_ATTN_PARTS)}"
                if value.ndim == 2:
                    value = value.reshape(*value.shape, 1, 1)
        elif rest.startswith("conv_norm_out."):
            new = "norm_out." + rest[len("conv_norm_out."):]
        else:
            new = rest  # conv_in / conv_out
        out[f"{coder}.{new}"] = value
    return out


def clip_to_ldm(sd: dict) -> dict:
    """Transformers CLIPTextModel -> LDM FrozenCLIPEmbedder layout: the HF names under `text_model.`."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}


_OPEN_CLIP_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_OPEN_CLIP_PARTS = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def open_clip_to_ldm(sd: dict) -> dict:
    """Transformers CLIPTextModelWithProjection -> OpenCLIP layout (fused in_proj, transposed projection)."""
    import torch

    out, qkv = {}, {}
    for key, value in sd.items():
        key = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value
        elif m := _OPEN_CLIP_LAYER.match(key):
            layer, rest = m.groups()
            if p := re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest):
                qkv.setdefault((layer, p.group(2)), {})[p.group(1)] = value
            else:
                out[f"transformer.resblocks.{layer}.{_rename_part(rest, _OPEN_CLIP_PARTS)}"] = value
        else:
            raise ExportError(f"text_encoder_2 weight {key!r} has no OpenCLIP equivalent")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ExportError(f"text_encoder_2 layer {layer}: incomplete q/k/v {kind}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def pipeline_to_ldm(pipe) -> tuple[dict, str]:
    """(LDM-layout state dict, family) for a StableDiffusionPipeline (SD1.x) or StableDiffusionXLPipeline."""
    unet_cfg = pipe.unet.config
    is_xl = getattr(pipe, "text_encoder_2", None) is not None
    if not is_xl and unet_cfg.cross_attention_dim == 1024:
        raise ExportError("SD2.x export (OpenCLIP text encoder) is not supported; SD1.x and SDXL are")
    sd: dict = {}
    for k, v in unet_to_ldm(pipe.unet.state_dict(), unet_cfg.layers_per_block).items():
        sd[UNET_PREFIX + k] = v
    for k, v in vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)).items():
        sd[VAE_PREFIX + k] = v
    clip_prefix = SDXL_CLIP_PREFIX if is_xl else SD_CLIP_PREFIX
    for k, v in clip_to_ldm(pipe.text_encoder.state_dict()).items():
        sd[clip_prefix + k] = v
    if is_xl:
        for k, v in open_clip_to_ldm(pipe.text_encoder_2.state_dict()).items():
            sd[SDXL_OPEN_CLIP_PREFIX + k] = v
    return sd, "sdxl" if is_xl else "sd15"


def export_single_file(pipe, path: str | os.PathLike, dtype=None) -> Path:
    """Write `pipe`'s UNet, VAE and text encoder(s) as one original-layout .safetensors file; returns the path.

    dtype: cast floating-point weights (e.g. torch.float16 halves the file); default keeps the pipeline's.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ExportError(f"{path}: single-file checkpoints are written as .safetensors only")
    sd, family = pipeline_to_ldm(pipe)
    tensors = {}
    for k, v in sd.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "sdserve.family": family})
    os.replace(tmp, path)  # readers never see a half-written checkpoint
    return path
