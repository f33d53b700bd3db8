"""ControlNet in the step loop (issue 19): ControlNets configured per model (EngineConfig.controlnets), loaded once
per replica, applied per sample inside shared UNet calls.

As diffusers 0.42's StableDiffusion(XL)ControlNetPipeline does for one request (guess_mode off): the ControlNet
sees the scaled latents, the timestep and the text embeddings of the UNet's rows (cond and uncond rows alike, the
same control image on both), its residuals are multiplied by conditioning_scale x keep, where keep = 0 while
i / n < start or (i + 1) / n > end (i: the sample's step in its own schedule, n: its steps), and they are added
to the UNet's down and mid blocks. Several ControlNets add up (MultiControlNetModel).

Batching: a UNet call mixes rows with and without ControlNets. Each ControlNet (and each repeat of one within a
request) runs once per call on only the rows that use it and act at this step, with a per-row scale tensor; its
residuals are index-added into zero tensors of all rows, so rows without a ControlNet get exactly zero (scale 0,
or a step outside [start, end), equals no ControlNet, bit for bit).

Control images are decoded and checked when a request is resolved (caller's thread), resized to the output size
(LANCZOS, as diffusers' control image processor) and preprocessed there ("canny": OpenCV's Canny edges, 100/200,
on the resized image), cached by content hash + size + preprocessor (core/caches.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.image_inputs import NO_URIS, UriPolicy, decode_image, invalid

CANNY_THRESHOLDS = (100, 200)  # diffusers' ControlNet docs' canny example


@dataclass(eq=False)
class ControlSpec:
    """One resolved control[i] of a request: its preprocessed map at the output size."""

    net: str
    map: np.ndarray  # HxWx3 uint8
    scale: float
    start: float
    end: float


@dataclass(eq=False)
class ControlUnit:
    """One ControlNet conditioning of one sample (DenoiseSample.controls)."""

    net: str
    cond: Any  # [1, 3, H, W] in [0, 1], the engine's dtype, on its device
    scale: float
    start: float
    end: float


# ---------------------------------------------------------------------------------------------- loading

def controlnet_family(net) -> str:
    return "sdxl" if net.config.addition_embed_type == "text_time" else "sd15"


def _load_one(cfg, engine_cfg, dtype):
    from diffusers import ControlNetModel

    from core.loading import ModelLoadError

    source = os.path.expanduser(cfg.source)
    if source.startswith("embedded:"):
        from core.embedded import ensure_controlnet_saved

        path = ensure_controlnet_saved(source.split(":", 1)[1], engine_cfg.cache_dir, engine_cfg.seed)
        return ControlNetModel.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
    path = Path(source)
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise ModelLoadError(f"ControlNet {cfg.name}: {source} does not exist")
        extra = {"config": cfg.single_file_config} if cfg.single_file_config else {}
        return ControlNetModel.from_single_file(source, torch_dtype=dtype,
                                                local_files_only=engine_cfg.local_files_only, **extra)
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise ModelLoadError(f"ControlNet {cfg.name}: {source}: pickle checkpoints are refused; use .safetensors")
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(f"ControlNet {cfg.name}: {source} has no config.json (not a diffusers ControlNet)")
    return ControlNetModel.from_pretrained(source, torch_dtype=dtype, use_safetensors=True, revision=cfg.revision,
                                           local_files_only=engine_cfg.local_files_only)


def load_controlnets(engine, pipe) -> dict:
    """Every configured ControlNet, on the engine's device and dtype, checked against the pipeline's UNet."""
    from core.loading import ModelLoadError

    nets, unet = {}, pipe.unet
    for cfg in engine.config.controlnets:
        try:
            net = _load_one(cfg, engine.config, engine.dtype)
        except ModelLoadError:
            raise
        except Exception as err:  # noqa: BLE001 - diffusers/hub errors: name the ControlNet
            raise ModelLoadError(f"ControlNet {cfg.name} ({cfg.source}) failed to load: {type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:300] if str(err) else ''}", engine.config.name,
                                 engine.config.source) from None
        fam = "sdxl" if engine.family == "sdxl" else "sd15"
        if controlnet_family(net) != fam or net.config.cross_attention_dim != unet.config.cross_attention_dim:
            raise ModelLoadError(f"ControlNet {cfg.name} ({cfg.source}) is for {controlnet_family(net)} "
                                 f"(cross_attention_dim {net.config.cross_attention_dim}) but model "
                                 f"{engine.config.name} is {engine.family} ({unet.config.cross_attention_dim})",
                                 engine.config.name, engine.config.source)
        nets[cfg.name] = net.to(engine.device).eval().requires_grad_(False)
    return nets


def describe(engine) -> list[dict]:
    """GET /v1/controlnets: [{name, family, source}] (family: the model's, which every ControlNet matches)."""
    return [{"name": c.name, "family": engine.family, "source": c.source} for c in engine.config.controlnets]


# ---------------------------------------------------------------------------------------------- requests

def canny(image: np.ndarray) -> np.ndarray:
    import cv2

    edges = cv2.Canny(image, *CANNY_THRESHOLDS)
    return np.repeat(edges[..., None], 3, axis=2)


def prepare(engine_cfg, req, uris: UriPolicy = NO_URIS, cache=None) -> list[ControlSpec]:
    """Check and preprocess a resolved request's control list (width/height filled). Raises GenerationError
    naming the field (control.<i>.model, control.<i>.image)."""
    from PIL import Image

    names = [c.name for c in engine_cfg.controlnets]
    specs = []
    for i, c in enumerate(req.control):
        if c.model not in names:
            raise invalid(f"control.{i}.model", f"control.{i}.model: unknown ControlNet {c.model!r}; model "
                          f"{engine_cfg.name} serves: {', '.join(names) if names else 'none'}")
        image = decode_image(c.image, f"control.{i}.image", engine_cfg.image_inputs, uris)
        key = (image.sha256, c.preprocess, req.width, req.height)
        cmap = cache.get(key) if cache is not None else None
        if cmap is None:
            img = image.image
            if img.size != (req.width, req.height):
                img = img.resize((req.width, req.height), Image.LANCZOS)
            cmap = np.asarray(img, dtype=np.uint8)
            if c.preprocess == "canny":
                cmap = canny(cmap)
            if cache is not None:
                cache.put(key, cmap)
        specs.append(ControlSpec(c.model, cmap, c.scale, c.start, c.end))
    return specs


def start(sample, specs: list[ControlSpec], device, dtype) -> None:
    """The sample's ControlNet units (its control maps as tensors; GPU thread, at admission)."""
    import torch

    sample.controls = [ControlUnit(s.net, (torch.from_numpy(np.array(s.map)).permute(2, 0, 1)[None].float() / 255.0).to(
        device=device, dtype=dtype), s.scale, s.start, s.end) for s in specs]


# ---------------------------------------------------------------------------------------------- one UNet call

def residuals(engine, samples: list, latents4, t_in, inputs):
    """(down_block_residuals, mid_block_residual) for every row of the call, or None when no row's ControlNet
    acts at this step. Rows: cond rows 0..n-1, then the uncond rows of the CFG samples (core/unet_step.py)."""
    import torch

    from core.device_copy import to_device

    n = len(samples)
    uncond_row = {j: n + k for k, j in enumerate(inputs.cfg)}
    groups: dict[tuple, list] = {}  # (net, k-th use within a sample) -> [(row, unit)]
    for j, s in enumerate(samples):
        if not s.controls:
            continue
        i, total, uses = s.step - s.first_step, s.calls, {}
        for u in s.controls:
            k = uses[u.net] = uses.get(u.net, -1) + 1
            if u.scale == 0 or i / total < u.start or (i + 1) / total > u.end:
                continue  # keep = 0 (diffusers' controlnet_keep): zero residuals for this row
            members = groups.setdefault((u.net, k), [])
            members.append((j, u))
            if j in uncond_row:
                members.append((uncond_row[j], u))
    if not groups:
        return None
    down = mid = None
    added, tcond = inputs.added_cond_kwargs, inputs.timestep_cond
    for (name, _), members in groups.items():
        # (pinned copies: a host tensor made on the GPU would wait for the queued steps, every step)
        rows = to_device(torch.tensor([r for r, _ in members], dtype=torch.long), latents4.device)
        cond = torch.cat([u.cond for _, u in members])
        scale = to_device(torch.tensor([u.scale for _, u in members], dtype=latents4.dtype),
                          latents4.device).view(-1, 1, 1, 1)
        with torch.no_grad():
            d, m = engine.controlnets[name](
                latents4.index_select(0, rows), t_in.index_select(0, rows),
                encoder_hidden_states=inputs.encoder_hidden_states.index_select(0, rows), controlnet_cond=cond,
                conditioning_scale=scale, timestep_cond=None if tcond is None else tcond.index_select(0, rows),
                added_cond_kwargs=None if added is None else {k: v.index_select(0, rows) for k, v in added.items()},
                return_dict=False)
        if down is None:
            down = [r.new_zeros((latents4.shape[0], *r.shape[1:])) for r in d]
            mid = m.new_zeros((latents4.shape[0], *m.shape[1:]))
        for acc, r in zip(down, d):
            acc.index_add_(0, rows, r)
        mid.index_add_(0, rows, m)
    return down, mid
