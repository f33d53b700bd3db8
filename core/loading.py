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
    """A model that cannot be loaded, said in one line: which model, which source was tried, what is wrong and
    what to change. CLIs print it as `error: <line>` (exit code 2); serving reports the same line."""

    def __init__(self, message: str, model: str | None = None, source: str | None = None):
        prefix = f"model {model!r} (source {source!r}): " if model and source else ""
        super().__init__(prefix + message)
        self.model, self.source, self.reason = model, source, message

    def __reduce__(self):  # picklable across Ray workers
        return (_rebuild_load_error, (str(self), self.model, self.source, self.reason))


def _rebuild_load_error(text: str, model, source, reason) -> "ModelLoadError":
    err = ModelLoadError(reason, model, source)
    err.args = (text,)
    return err


LOCAL_HINT = ("point engine.source at a local diffusers folder (save_pretrained layout) or a .safetensors file, "
              "or use embedded:tiny-sd")




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
            raise ModelLoadError(f"single-file checkpoint {source} does not exist; fix engine.source "
                                 "(paths are read on the machine that loads the model)")
        return "single_file"
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"{source} is a folder but has no model_index.json (not a diffusers pipeline); "
                                 "save one with pipe.save_pretrained(folder) or point engine.source at a "
                                 ".safetensors file")
        return "folder"
    if path.is_file():
        raise ModelLoadError(f"{source} is a {path.suffix or 'suffix-less'} file: only .safetensors checkpoints "
                             "and diffusers folders are loaded")
    if HUB_ID.match(source) and not source.startswith((".", "~")):
        return "hub"
    if source.startswith(("/", "./", "../", "~")) or "/" in source or "\\" in source:
        raise ModelLoadError(f"local path {source} does not exist; fix engine.source (paths are read on the "
                             "machine that loads the model)")
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

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError for a bad header
        raise ModelLoadError(f"{path} is not a readable .safetensors file ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else 'bad header'})") from None
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


def hub_offline(config: EngineConfig) -> bool:
    return config.local_files_only or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_family(config: EngineConfig, detected: str) -> None:
    """A configured family that is not the checkpoint's would load the wrong pipeline class (and fail deep in
    diffusers with a shape error): say which family the files are."""
    if config.family not in ("auto", detected) and not {config.family, detected} <= {"sd15", "sd21"}:
        raise ModelLoadError(f"the checkpoint is {detected} but engine.family is {config.family}; set "
                             f"family: auto (or {detected})")


def check_source(config: EngineConfig) -> str:
    """What can be checked without reading weights, on the machine that runs it (the CLIs call it before
    deploying): the source kind, the family of local files, and for a hub id offline, the local cache.
    Returns the kind; raises ModelLoadError naming the model and source."""
    try:
        kind = source_kind(config.source)
        source = os.path.expanduser(config.source)
        if kind == "folder":
            check_family(config, family_of_folder(Path(source)))
        elif kind == "single_file":
            check_family(config, family_of_single_file(Path(source)))
        elif kind == "hub" and hub_offline(config) and not _hub_cached(config):
            raise ModelLoadError(_hub_message(config, "the hub is off (HF_HUB_OFFLINE / local_files_only)"))
        return kind
    except ModelLoadError as err:
        raise _named(err, config) from None


def _hub_cached(config: EngineConfig) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(config.source, "model_index.json", revision=config.revision)
    return isinstance(found, str)


def _hub_message(config: EngineConfig, why: str) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (f"{why} and {config.source} is not in the local cache ({HF_HUB_CACHE}); download it where there is "
            f"network (`hf download {config.source}`, then copy the cache), or {LOCAL_HINT}")


def _named(err: ModelLoadError, config: EngineConfig) -> ModelLoadError:
    if err.model is not None:
        return err
    return ModelLoadError(err.reason, config.name, config.source)


def load_pipeline(config: EngineConfig, device: str, dtype, onto_device: bool = False):
    """Return (pipeline in `dtype`, family): on the CPU, placement being the memory level's job, or with
    `onto_device` (fully resident levels) read straight onto the GPU: safetensors land in VRAM with no host
    copy (with it and compiled .pyc files, about halves an SDXL warm start's load: docs/benchmarks.md).

    Every failure is a ModelLoadError naming the model, the source and what to change (one line)."""
    try:
        return _load_pipeline(config, device, dtype, onto_device)
    except ModelLoadError as err:
        raise _named(err, config) from None
    except OSError as err:  # diffusers/huggingface_hub: not found, not cached, hub unreachable
        kind = source_kind(config.source)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if kind == "hub":
            why = "the hub is off (HF_HUB_OFFLINE / local_files_only)" if hub_offline(config) else \
                "the hub could not be reached or has no such model"
            raise ModelLoadError(_hub_message(config, why), config.name, config.source) from None
        raise ModelLoadError(f"{first[:300]}; {LOCAL_HINT}", config.name, config.source) from None


def _load_pipeline(config: EngineConfig, device: str, dtype, onto_device: bool):
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
        detected = family_of_single_file(Path(source))
        check_family(config, detected)
        family = family or detected
        if not config.single_file_config and hub_offline(config):
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
            detected = family_of_folder(Path(source))
            if config.embedded_name is None:
                check_family(config, detected)
            family = family or detected
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
