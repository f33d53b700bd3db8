"""Model loading: embedded models, local diffusers folders, single-file .safetensors, hub ids.

Safetensors only: a pickle checkpoint (.ckpt/.pt/.bin) is refused, never unpickled.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from core.config import EngineConfig

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(RuntimeError):
    pass


def resolve_device(device: str) -> str:
    """'auto' -> cuda:N (current device) or cpu; 'cuda' -> 'cuda:N' (CUDA memory APIs need an index)."""
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def source_kind(source: str) -> str:
    """embedded | single_file | folder | hub."""
    if source.startswith("embedded:"):
        return "embedded"
    path = Path(os.path.expanduser(source))
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{source}: pickle checkpoints are refused (they can run code when loaded); "
                             "convert to .safetensors")
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise ModelLoadError(f"single-file checkpoint {source} does not exist")
        return "single_file"
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"{source} is a folder but has no model_index.json (not a diffusers pipeline)")
        return "folder"
    if HUB_ID.match(source):
        return "hub"
    raise ModelLoadError(f"model source {source!r} is not an embedded model, an existing folder, a "
                         ".safetensors file or a hub id 'org/name'")


def family_of_folder(path: Path) -> str:
    index = json.loads((path / "model_index.json").read_text())
    if "XL" in index.get("_class_name", ""):
        return "sdxl"
    unet_cfg = path / "unet" / "config.json"
    if unet_cfg.exists() and json.loads(unet_cfg.read_text()).get("cross_attention_dim") == 1024:
        return "sd21"
    return "sd15"


def family_of_single_file(path: Path) -> str:
    """Detect the family from tensor names only (no weights read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd21"
    if any(k.startswith(("cond_stage_model.transformer.", "model.diffusion_model.")) for k in keys):
        return "sd15"
    raise ModelLoadError(f"{path}: not a Stable Diffusion checkpoint (no known tensor names)")


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def quiet_libraries() -> None:
    """Progress bars and per-component chatter from diffusers/transformers do not belong in server logs."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def direct_device_map(device: str) -> str | None:
    """diffusers' device_map for loading straight onto `device` (the current CUDA device only: its pipeline
    loader accepts "cuda", not "cuda:N"); None where weights go through host memory."""
    if not device.startswith("cuda"):
        return None
    import torch

    return "cuda" if torch.device(device).index in (None, torch.cuda.current_device()) else None


def load_pipeline(config: EngineConfig, device: str, dtype, onto_device: bool = False):
    """Return (pipeline in `dtype`, family): on the CPU, placement being the memory level's job, or with
    `onto_device` (fully resident levels) read straight onto the GPU: safetensors land in VRAM with no host
    copy (with it and compiled .pyc files, about halves an SDXL warm start's load: docs/benchmarks.md)."""
    quiet_libraries()
    kind = source_kind(config.source)
    family = None if config.family == "auto" else config.family
    if kind == "embedded":
        name = config.embedded_name
        if name in ("sd15", "sdxl"):
            from core.embedded import build_pipeline

            log.warning("model %s: real %s architecture with RANDOM weights (benchmarks; images are noise)",
                        config.name, name)
            pipe = build_pipeline(name, config.seed, device=device, dtype=dtype)
            if device.startswith("cuda") and not onto_device:
                # Built on the GPU for speed, but an offloading level places it from host memory, and the VRAM
                # budget (enforced after loading) counts every block the allocator still holds: with the whole
                # SDXL build left there, BALANCED/AGGRESSIVE under a 5 GiB cap failed to allocate their first
                # copy slot.
                from core.memory import free_memory

                pipe.to("cpu")
                free_memory()
            return pipe, name
        from core.embedded import NOISE_NOTE, ensure_saved

        log.warning("model %s: %s", config.name, NOISE_NOTE)
        path = ensure_saved(name, config.cache_dir, config.seed)
        kind, source = "folder", str(path)
        family = "sdxl" if name == "tiny-sdxl" else "sd15"
    else:
        source = os.path.expanduser(config.source)
    extra = {"dtype": dtype}
    if kind == "single_file":
        family = family or family_of_single_file(Path(source))
        hub_off = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        offline = config.local_files_only or hub_off
        if not config.single_file_config and offline:
            # diffusers would fetch the component configs from the hub anyway (it overrides local_files_only).
            raise ModelLoadError(f"{source}: offline, a single-file checkpoint needs single_file_config (a local "
                                 "diffusers folder of the same family holding the component configs)")
        if config.single_file_config:
            extra["config"] = config.single_file_config
        if config.local_files_only:
            extra["local_files_only"] = True
        cls = pipeline_class(family)
        pipe = cls.from_single_file(source, **extra)
    else:
        extra["use_safetensors"] = True  # refuses pickle weights in folders and on the hub
        if kind == "folder":
            family = family or family_of_folder(Path(source))
        else:
            extra.update(revision=config.revision, local_files_only=config.local_files_only)
            family = family or ("sdxl" if "xl" in source.lower() else "sd15")
        cls = pipeline_class(family)
        if cls.__name__ == "StableDiffusionPipeline":
            extra.update(safety_checker=None, requires_safety_checker=False)
        device_map = direct_device_map(device) if onto_device else None
        if device_map:
            extra["device_map"] = device_map
        pipe = cls.from_pretrained(source, **extra)
    if family == "sd15" and pipe.unet.config.cross_attention_dim == 1024:
        family = "sd21"
    return pipe, family
