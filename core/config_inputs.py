"""The engine config's parts for what requests bring in: LoRA libraries, ControlNets, the engine's caches, and
the embedded-source names they check (re-exported by core.config; importing this stays cheap: pydantic only).
"""
from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, field_validator

from core.strict import Strict

EMBEDDED_PREFIX = "embedded:"
# Embedded ControlNets (random weights) matching tiny-sd / tiny-sdxl.
EMBEDDED_CONTROLNETS = ("tiny-sd-controlnet", "tiny-sdxl-controlnet")


def known_embedded(source: str, names: tuple[str, ...], what: str) -> str:
    """`source` unless it names an embedded `what` (model, ControlNet) that does not exist."""
    if source.startswith(EMBEDDED_PREFIX) and source[len(EMBEDDED_PREFIX):] not in names:
        raise ValueError(f"unknown embedded {what} {source!r}; valid: " + ", ".join(EMBEDDED_PREFIX + m for m in names))
    return source


def expand_env(value: str) -> str:
    """`${VAR:-default}` and `$VAR` / `${VAR}` in a config string, from the environment (YAML stays portable)."""
    def sub(m: "re.Match") -> str:
        name, default = m.group(1) or m.group(3), m.group(2)
        got = os.environ.get(name)
        return got if got else (default or "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, value)


class LoraConfig(Strict):
    """The model's LoRA library (core/lora_library.py) and the adapter caches (core/lora_cache.py,
    core/lora_apply.py). Requests pick adapters per request (`loras` field or `<lora:name:weight>` in the
    prompt); requests with different adapters still share UNet calls (a low-rank delta per sample)."""

    uri: str = Field(..., min_length=1, max_length=4096, description="Folder or fsspec URI of *.safetensors "
                     "LoRAs (file name without extension = LoRA name; subfolders give 'sub/name'). "
                     "`${VAR:-default}` is expanded from the environment. Rescanned when a name is missing.")
    host_cache_mb: int = Field(2048, ge=0, le=1_048_576, description="Host-RAM LRU of converted adapters "
                               "(pinned on CUDA), in MiB; beyond it the least recently used are dropped.")
    max_rank: int = Field(64, ge=1, le=1024, description="Rank of a GPU adapter slot: the summed ranks of one "
                          "request's LoRAs must fit (fixed so a compiled UNet never recompiles).")
    gpu_slots: int = Field(4, ge=1, le=64, description="Distinct adapter sets one UNet call can hold (one slot "
                           "each, max_rank wide, on every targeted layer); more sets wait for the next call.")
    targets: Literal["attention", "all"] = Field(
        "attention", description="UNet layers given adapter slots: attention (transformer blocks' linears and "
        "proj_in/out: what kohya/diffusers LoRAs train by default) or all (also resnet convs, time embeddings, "
        "down/upsamplers: LoCon-style LoRAs). A LoRA touching other layers is refused.")
    max_loras: int = Field(8, ge=1, le=32, description="Most LoRAs one request may use.")

    @field_validator("uri")
    @classmethod
    def _expand(cls, value: str) -> str:
        out = expand_env(value)
        if not out:
            raise ValueError("loras.uri is empty after expanding environment variables")
        # a local folder is made absolute here: Ray workers need not share the CLI's working directory
        return out if "://" in out else os.path.abspath(os.path.expanduser(out))


class CacheConfig(Strict):
    """Bytes-bounded LRU caches of the engine (core/caches.py); 0 turns one off. Hits and misses are in
    Engine.info()["caches"] and the metrics."""

    prompt_embeddings_mb: float = Field(64, ge=0, le=65536, description="Text-encoder outputs by (prompt, "
                                        "negative prompt, CFG on/off): a repeated prompt skips the text encoders.")
    init_latents_mb: float = Field(256, ge=0, le=65536, description="VAE-encoded init/masked images by content "
                                   "hash and size: a repeated init image skips the VAE encoder.")
    control_maps_mb: float = Field(128, ge=0, le=65536, description="Preprocessed ControlNet conditioning maps "
                                   "(e.g. canny edges) by content hash, size and preprocessor.")


class ControlNetConfig(Strict):
    """One ControlNet a model serves (requests name it in control[i].model); loaded once per replica."""

    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$",
                      description="Name requests use (control[i].model) and GET /v1/controlnets lists.")
    source: str = Field(..., min_length=1, max_length=4096, description=(
        "'embedded:tiny-sd-controlnet|tiny-sdxl-controlnet' (random weights, tests), a hub id ('org/name'), a "
        "local diffusers ControlNet folder (config.json + safetensors), or a single .safetensors file."))
    single_file_config: str | None = Field(None, max_length=4096, description="For a single .safetensors: a "
                                           "local folder or hub id holding the ControlNet's config.json (needed "
                                           "offline).")
    revision: str | None = Field(None, max_length=256, description="Hub revision.")

    @field_validator("source")
    @classmethod
    def _known_embedded(cls, value: str) -> str:
        return known_embedded(value, EMBEDDED_CONTROLNETS, "ControlNet")
