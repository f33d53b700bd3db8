"""Typed engine configuration: one object flows YAML/CLI -> builder -> engine.

Importing this module must stay cheap: no torch, no diffusers, no Ray.
"""
from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from core.config_inputs import (  # noqa: F401 - re-exported: callers import these from core.config
    EMBEDDED_CONTROLNETS, EMBEDDED_PREFIX, CacheConfig, ControlNetConfig, LoraConfig, expand_env, known_embedded)
from core.image_fields import ImageInputLimits
from core.strict import Strict  # noqa: F401 - re-exported: most modules import Strict from here

# Built-in models that need no download. tiny-* are small random-weight pipelines (noise images);
# sd15/sdxl are the real architectures at full size with random weights (benchmarks).
EMBEDDED_MODELS = ("tiny-sd", "tiny-sdxl", "tiny-sd-inpaint", "sd15", "sdxl")
# tiny-sd-inpaint: tiny-sd with a 9-channel inpainting UNet (latents + mask + masked-image latents).


def default_cache_dir() -> str:
    return os.environ.get("SDSERVE_CACHE_DIR", str(Path.home() / ".cache" / "sdserve"))


Side = Annotated[int, Field(ge=64, le=8192, multiple_of=8)]  # an image width or height in pixels


# BALANCED streams this share of the UNet's bytes by default: SDXL's copies then take less time than its resident
# denoising even when the host paces it fast (copy bound vs NONE: docs/benchmarks.md, "Memory levels")
BALANCED_SHARE = 0.6

class MemoryLevel(str, Enum):
    NONE = "none"
    BALANCED = "balanced"
    AGGRESSIVE = "aggressive"
    ULTRA = "ultra"
    AUTO = "auto"


class StepCacheConfig(Strict):
    """DeepCache-style step caching (core/step_cache.py): between full UNet steps, shallow steps reuse the deep
    features of the last full one. Faster, and images change: a quality/speed trade."""

    interval: int = Field(3, ge=1, le=10, description="Every interval-th denoising step runs the whole UNet, the "
                          "others only its shallowest blocks. 1: every step in full (same images as off).")
    first_full_steps: int = Field(1, ge=1, le=50, description="The first N steps always run the whole UNet "
                                  "(the image's layout forms there).")


class CompileArtifactsConfig(Strict):
    """torch.compile's portable cache artifacts (torch.compiler.save_cache_artifacts / load_cache_artifacts: the
    FX graph, AOTAutograd, Triton and autotuning caches in one blob) in a store shared by replicas, keyed by GPU,
    torch/CUDA/Python versions, model identity, optimization settings and warm-up shapes (core/compile_cache.py).
    A replica with compile on loads its key's artifacts before warm-up (the warm-up then compiles from cache);
    on a miss it compiles and, with write on, uploads them. `sdserve precompile CONFIG` fills the store ahead."""

    store: str | None = Field(None, min_length=1, max_length=4096, description="An fsspec URI or a local "
                              "folder: s3://bucket/prefix/, gs://..., file:///mnt/nfs/sdserve-cache/, "
                              "/shared/cache. Remote schemes need their fsspec package (s3fs, gcsfs) where the "
                              "replicas run. null: cache_dir/compile on this machine.")
    read: bool = Field(True, description="Look the key up at start and load the artifacts before warm-up.")
    write: bool = Field(True, description="After a warm-up that compiled (a miss), upload the artifacts (atomic: "
                        "temporary name, then a rename or single put; concurrent writers: the last one wins). "
                        "false: only `sdserve precompile` writes (read-only replicas).")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Longest wait for one store read or write; past "
                             "it the replica warns and compiles normally (a store never fails a replica).")

    @field_validator("store")
    @classmethod
    def _known_protocol(cls, value: str | None) -> str | None:
        match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", value or "")
        if match:
            from fsspec.registry import known_implementations, registry

            protocols = {p for name in (*known_implementations, *registry) for p in name.split("::")}
            if match.group(1) not in protocols:
                raise ValueError(f"{match.group(1)!r} is not an fsspec protocol (e.g. s3://, gs://, file://, or a "
                                 "local folder)")
        return value


class OptimizationConfig(Strict):
    """Speed settings, applied at load in the fixed order documented in core/optimizations.py."""

    attention: Literal["sdpa", "xformers", "auto", "default"] = Field(
        "sdpa", description="Attention backend: PyTorch SDPA, xformers (if installed), auto (xformers when "
        "importable else SDPA), or diffusers' default processor.")
    fuse_qkv: bool = Field(False, description="Fuse the Q/K/V projections of self-attention into one matmul.")
    channels_last: bool = Field(False, description="Store UNet/VAE weights in channels_last memory format.")
    vae_slicing: bool = Field(False, description="Decode the batch one image at a time (less VRAM).")
    vae_tiling: bool = Field(False, description="Decode the latent in tiles (large images, less VRAM).")
    attention_slicing: bool = Field(False, description="Compute attention in slices (less VRAM, slower).")
    compile: Literal["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs",
                     "cudagraphs", "aoti"] = Field(
        "none", description="torch.compile mode for the UNet (and the VAE decoder when compile_vae). cudagraphs: "
        "torch.compile's cudagraphs backend, Dynamo capture replayed as CUDA graphs with eager kernels and no "
        "Inductor code generation: no per-launch host cost, warm-up in seconds instead of minutes, slower "
        "kernels than reduce-overhead; the UNet only (compile_vae does not apply). aoti: AOTInductor packages "
        "of the UNet, one per warmed shape, opened at start with no Dynamo trace (core/aoti_unet.py): compiled "
        "replicas ready in seconds from the artifact store; the UNet only, no CUDA graphs; not with loras, "
        "step_cache, capture_step or fp8.")
    compile_vae: bool = Field(True, description="Also compile the VAE decoder when compile is not 'none'.")
    compile_artifacts: CompileArtifactsConfig = Field(
        default_factory=CompileArtifactsConfig, description="Where compiled code is shared between "
        "replicas and hosts: torch's portable cache artifacts (core/compile_cache.py), e.g. {store: "
        "'s3://bucket/sdserve-cache/'}. Default: cache_dir/compile on this machine.")
    fp8: bool | Literal["dynamic", "static"] = Field(
        False, description="FP8 (float8 e4m3) matmuls for the UNet's transformer linears on sm_89+: true/dynamic "
        "(per-row scales computed every call) or static (activation scales calibrated once at load). Opt-in: "
        "changes images slightly.")
    sdpa_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = Field(
        "auto", description="Kernel behind PyTorch SDPA: auto (PyTorch's choice) or a fixed one; cudnn is "
        "fastest on Hopper for SD shapes (see docs/benchmarks.md).")
    warmup_shapes: list[tuple[Side, Side, Annotated[int, Field(ge=1, le=256)]]] = Field(
        default_factory=list, description="(width, height, batch) shapes to warm up / compile at load. Empty: "
        "the default size at batch 1.")
    batch_buckets: list[int] = Field(default_factory=list, description="Batch sizes compiled ahead when "
                                     "compile is on; a batch is padded up to the next bucket. Empty: powers of "
                                     "two up to limits.max_batch_size.")
    warmup_steps: int = Field(2, ge=0, le=50, description="Denoising steps per warm-up call (0 = no warm-up).")
    step_cache: StepCacheConfig | None = Field(None, description="Opt-in DeepCache-style step caching, e.g. "
                                               "{interval: 3}; null = off. Changes images (quality/speed trade).")
    capture_step: bool = Field(False, description="Prototype: the UNet, the CFG combine and the Euler step in one "
                               "compiled function (one CUDA graph per step with reduce-overhead) for groups using "
                               "the euler scheduler; other schedulers and step_cache take the usual path "
                               "(core/captured_step.py).")

    @field_validator("compile_artifacts", mode="before")
    @classmethod
    def _old_compile_artifacts(cls, value: Any) -> Any:
        if value == "cache":  # the old default, unchanged in meaning: artifacts in cache_dir on this machine
            return {}
        if value == "aot":
            raise ValueError("'aot' was removed (its aot_compile functions failed to pickle Dynamo's guards on "
                             "torch 2.11 CUDA); use optimization.compile_artifacts: {store: <fsspec URI or "
                             "folder>} (torch's portable cache artifacts), or leave the key out")
        return value


# `preset:` per model: named bundles of optimization fields (docs/presets-and-cold-start.md). Fields written under
# `optimization:` override the preset's; the preset overrides the field defaults.
EXACT = {"attention": "sdpa", "sdpa_backend": "cudnn", "fuse_qkv": True, "channels_last": True,
         "compile": "reduce-overhead", "compile_vae": True}
PRESETS: dict[str, dict[str, Any]] = {
    "exact": EXACT,  # the lossless best: images as fp16 eager's, within fp16 noise
    "fast": {**EXACT, "fp8": "static"},  # + FP8 transformer linears (sm_89+; ignored elsewhere): near-lossless
    "fastest": {**EXACT, "fp8": "static", "step_cache": {"interval": 3, "first_full_steps": 1}},  # + step caching
}


def apply_preset(data: Any) -> Any:
    """EngineConfig input with `preset` expanded under the explicitly written optimization fields."""
    if not isinstance(data, dict) or data.get("preset") is None or data["preset"] not in PRESETS:
        return data  # no preset, or an unknown one (the field's own validation names it)
    explicit = data.get("optimization") or {}
    if isinstance(explicit, BaseModel):
        explicit = explicit.model_dump(exclude_unset=True)
    return {**data, "optimization": {**PRESETS[data["preset"]], **explicit}}


class MemoryConfig(Strict):
    level: MemoryLevel = Field(MemoryLevel.NONE, description="none | balanced | aggressive | ultra | auto.")
    vram_budget_gib: float | None = Field(
        None, gt=0, le=4096, description="VRAM budget in GiB. Default: total VRAM x gpu_fraction.")
    gpu_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of the GPU this replica owns "
                                "(Ray num_gpus); enforced with torch.cuda.set_per_process_memory_fraction.")
    enforce_budget: bool = Field(True, description="Cap this process's CUDA allocations at the budget.")
    offload: Literal["auto", "stream", "model", "group-block", "group-leaf", "sequential"] = Field(
        "auto", description="How a level below NONE keeps weights off the GPU. auto and stream: UNet transformer "
        "blocks (balanced: streamed_share of the UNet's bytes; aggressive, ultra: all of them) and CLIP layers "
        "copied from pinned host memory a few blocks ahead on a side CUDA stream, the rest resident; group-block: "
        "diffusers group offloading of every block and layer; model: whole components in turn; group-leaf: "
        "per-layer streaming; sequential: accelerate's per-layer hooks (slowest).")
    streamed_share: float = Field(BALANCED_SHARE, ge=0, le=1, description="BALANCED: fraction of the UNet's "
                                  "weight bytes streamed in every call, up to what its transformer blocks hold "
                                  "(SDXL ~85%); less keeps more resident: more VRAM, fewer copies to hide.")
    fp8_storage: bool = Field(False, description="Keep the UNet's weights in fp8 (e4m3) at offloading levels: "
                              "with offload stream, the streamed blocks are stored and copied as fp8 and scaled "
                              "back on the GPU (half the copies and pinned host memory; no faster than fp16 "
                              "streaming where measured: docs/benchmarks.md); with other offloads, diffusers' "
                              "layerwise casting. Images change.")
    stream_lookahead: int | None = Field(None, ge=1, le=32, description="offload stream: how many streamed blocks "
                                         "are copied ahead of the one computing (each takes one more block-sized "
                                         "device slot). Default: the level's (balanced, aggressive 12; ultra 2).")


class LimitsConfig(Strict):
    max_width: int = Field(2048, ge=64, le=8192, description="Largest accepted width in pixels.")
    max_height: int = Field(2048, ge=64, le=8192, description="Largest accepted height in pixels.")
    max_pixels: int = Field(2048 * 2048, ge=64 * 64, le=8192 * 8192, description="Largest width x height.")
    max_steps: int = Field(150, ge=1, le=1000, description="Most denoising steps per request.")
    max_images_per_request: int = Field(8, ge=1, le=64, description="Most images one request may ask for.")
    max_batch_size: int = Field(8, ge=1, le=256, description="Most images in one UNet call (the step "
                                "scheduler's batch per shape; also capped by the VRAM budget).")
    max_prompt_chars: int = Field(2000, ge=1, le=100_000, description="Longest accepted prompt, in characters.")


class SchedulingConfig(Strict):
    """How the engine's step-level scheduler (core/step_scheduler.py) batches requests into UNet calls."""

    admission: Literal["step", "batch"] = Field(
        "step", description="step: waiting requests join a running batch of their shape at the next denoising "
        "step and leave when done (continuous batching). batch: a shape's batch admits only when it is empty "
        "(request-level batching; the baseline the load benchmark compares against).")
    min_share: float = Field(0.25, ge=0, le=0.5, description="Across shapes the scheduler runs the group with the "
                             "least remaining work first, but every group with work gets at least this share of the "
                             "UNet calls or of the GPU time (share_unit; a group passed over earns min_share of each "
                             "call; one owed a whole call runs next): a large request finishes within about its "
                             "steps / min_share calls' worth while small ones keep arriving, and small ones give up "
                             "at most this share (0.5: two busy groups alternate). 0: least work only, starvation_s "
                             "alone bounds the wait (the old policy).")
    share_unit: Literal["auto", "calls", "time"] = Field(
        "auto", description="What min_share counts. calls: UNet calls (best where the small sizes' calls are "
        "host-bound: eager). time: measured GPU time per call (CUDA events, no host wait; best where a large call "
        "costs several small ones: a compiled UNet). auto: time when the UNet is compiled, else calls "
        "(experiments/scheduling_sim.py: each unit's better mode).")
    starvation_s: float = Field(2.0, gt=0, le=600, description="A group whose call set has not run for this many "
                                "seconds runs next regardless of work and shares: the hard time bound on how long "
                                "any image is held back.")


class RequestDefaults(Strict):
    """Per-model defaults for request fields the client leaves out (None: the family's default)."""

    width: int | None = Field(None, ge=64, le=8192, multiple_of=8, description="Default width.")
    height: int | None = Field(None, ge=64, le=8192, multiple_of=8, description="Default height.")
    steps: int | None = Field(None, ge=1, le=1000, description="Default denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="Default CFG scale.")
    negative_prompt: str = Field("", max_length=10_000, description="Default negative prompt.")


class PreviewConfig(Strict):
    """Live previews while a request denoises (core/previews.py), sent as SSE `preview` events of async jobs."""

    method: Literal["latent2rgb", "taesd", "none"] = Field(
        "latent2rgb", description="latent2rgb: a fixed linear latent->RGB map per family (no weights, ~free); "
        "taesd: a tiny VAE decoder (diffusers AutoencoderTiny, weights from `taesd`); none: no previews.")
    every_n_steps: int = Field(5, ge=1, le=1000, description="A preview after every N-th denoising step (the "
                               "last step never: the final image follows).")
    taesd: str | None = Field(None, min_length=1, max_length=4096, description="method taesd: a local folder "
                              "or hub id of AutoencoderTiny weights matching the family (taesd for SD1.5/2.x, "
                              "taesdxl for SDXL).")
    max_side: int = Field(256, ge=32, le=1024, description="Longer side of a preview JPEG in pixels.")
    jpeg_quality: int = Field(70, ge=10, le=95, description="JPEG quality of previews.")

    @model_validator(mode="after")
    def _taesd_weights(self) -> "PreviewConfig":
        if self.method == "taesd" and not self.taesd:
            raise ValueError("previews.method 'taesd' needs previews.taesd (a folder or hub id of its weights)")
        return self


class EngineConfig(Strict):
    """Everything one engine (one model) needs. Loadable from YAML; every key checked."""

    name: str = Field("tiny-sd", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$",
                      description="Model name that requests and results use.")
    source: str = Field("embedded:tiny-sd", min_length=1, max_length=4096, description=(
        "Where the weights come from: 'embedded:tiny-sd|tiny-sdxl|sd15|sdxl', a Hugging Face hub id "
        "('org/name'), a local diffusers folder, or a single-file .safetensors checkpoint."))
    family: Literal["auto", "sd15", "sd21", "sdxl"] = Field(
        "auto", description="Model family; auto detects it from the folder/checkpoint.")
    single_file_config: str | None = Field(None, max_length=4096, description=(
        "For a single-file checkpoint: a local diffusers folder or hub id holding the component configs "
        "(needed offline)."))
    revision: str | None = Field(None, max_length=256, description="Hub revision.")
    local_files_only: bool = Field(False, description="Never contact the hub (HF_HUB_OFFLINE also works).")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="Weights/compute dtype. auto = fp16 on CUDA, fp32 on CPU.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda[:N].")
    scheduler: str = Field("euler", max_length=64, description="Default scheduler name.")
    cache_dir: str = Field(default_factory=default_cache_dir, description="Where embedded models, hub "
                           "downloads and compile caches live (shared by replicas).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for building embedded random weights.")
    preset: Literal["exact", "fast", "fastest"] | None = Field(
        None, description="Optimization preset: exact (compile with CUDA graphs, fused QKV, cuDNN SDPA, "
        "channels_last: same images as fp16 eager within fp16 noise) | fast (exact + static FP8 transformer "
        "linears on sm_89+: near-lossless) | fastest (fast + step caching every 3rd step: images change). Fields "
        "set under optimization override the preset's. null: the optimization fields alone.")
    optimization: OptimizationConfig = Field(default_factory=OptimizationConfig, description="Speed settings "
                                             "(over the preset's, when one is set).")
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="Memory level and VRAM budget.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits.")
    defaults: RequestDefaults = Field(default_factory=RequestDefaults, description="Request defaults.")
    scheduling: SchedulingConfig = Field(default_factory=SchedulingConfig, description="Step-level batching: "
                                         "admission policy and the cross-shape starvation bound.")
    previews: PreviewConfig = Field(default_factory=PreviewConfig, description="Live previews of async jobs "
                                    "(method, every_n_steps, TAESD weights).")
    image_inputs: ImageInputLimits = Field(default_factory=ImageInputLimits, description="Limits on the input "
                                           "images of a request (init_image, mask_image, control images), checked "
                                           "before their pixels are decoded.")
    caches: CacheConfig = Field(default_factory=CacheConfig, description="Prompt-embedding, init-latent and "
                                "control-map caches (MB each; 0 = off).")
    controlnets: list[ControlNetConfig] = Field(default_factory=list, max_length=16, description="ControlNets "
                                                "this model serves, e.g. [{name: pose, source: org/controlnet}]; "
                                                "of the model's family (SD1.5/2.x or SDXL).")
    prompt_weighting: bool = Field(False, description="A1111 prompt emphasis ((word), (word:1.3), [word]) and "
                                   "prompts beyond 77 tokens, encoded with compel (core/prompt_weighting.py). Opt-in: "
                                   "changes images (every prompt is padded to prompt_chunks chunks).")
    prompt_chunks: int = Field(3, ge=1, le=8, description="prompt_weighting: 77-token chunks every prompt is encoded "
                               "to (longer prompts are cut there), one length for all so requests share UNet calls.")
    loras: LoraConfig | None = Field(None, description="LoRA library and adapter caches, e.g. {uri: ./loras}; "
                                     "null = requests cannot use LoRAs.")

    @field_validator("controlnets")
    @classmethod
    def _unique_controlnet_names(cls, value: list[ControlNetConfig]) -> list[ControlNetConfig]:
        names = [c.name for c in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"ControlNet names must be unique: {', '.join(dupes)} repeated")
        return value

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        return apply_preset(data)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        from core.schedulers import check_scheduler_name

        return check_scheduler_name(value)

    @field_validator("source")
    @classmethod
    def _known_embedded(cls, value: str) -> str:
        return known_embedded(value, EMBEDDED_MODELS, "model")

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> "EngineConfig":
        d, lim = self.defaults, self.limits
        if d.width and d.width > lim.max_width:
            raise ValueError(f"defaults.width {d.width} exceeds limits.max_width {lim.max_width}")
        if d.height and d.height > lim.max_height:
            raise ValueError(f"defaults.height {d.height} exceeds limits.max_height {lim.max_height}")
        if d.steps and d.steps > lim.max_steps:
            raise ValueError(f"defaults.steps {d.steps} exceeds limits.max_steps {lim.max_steps}")
        return self

    @model_validator(mode="after")
    def _aoti_scope(self) -> "EngineConfig":
        # An AOTInductor package holds the UNet's graph as exported at warm-up: LoRA layers, step-cache hooks,
        # the captured step and FP8 layers change that graph or run beside it, so they would be left out silently.
        opt = self.optimization
        if opt.compile != "aoti":
            return self
        clashes = [name for name, on in (("loras", self.loras is not None), ("optimization.step_cache",
                   opt.step_cache is not None), ("optimization.capture_step", opt.capture_step),
                   ("optimization.fp8", bool(opt.fp8))) if on]
        if clashes:
            raise ValueError(f"optimization.compile 'aoti' does not combine with {', '.join(clashes)} (use "
                             "compile: reduce-overhead for them)")
        return self

    @model_validator(mode="after")
    def _loras_need_unfused_attention(self) -> "EngineConfig":
        if self.loras is not None and self.optimization.fuse_qkv:
            raise ValueError("loras: needs optimization.fuse_qkv false (LoRAs target to_q/to_k/to_v separately)")
        return self

    @property
    def embedded_name(self) -> str | None:
        return self.source[len(EMBEDDED_PREFIX):] if self.source.startswith(EMBEDDED_PREFIX) else None

    @property
    def is_noise_model(self) -> bool:
        """True when the weights are random: images are noise (said in logs, results and README)."""
        return self.embedded_name is not None


def format_validation_error(exc: Exception) -> str:
    """One line per error, naming the key path (e.g. 'limits.max_steps: Input should be <= 1000')."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    lines = []
    for err in errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        lines.append(f"{loc}: {err.get('msg')}")
    return "; ".join(lines)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_engine_config(path: str | os.PathLike | None = None, **overrides: Any) -> EngineConfig:
    """Read an EngineConfig from YAML (a bare engine config or a file with an `engine:` key)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml(path)
        if "engine" in data and len(data) == 1:
            data = data["engine"]
    data.update({k: v for k, v in overrides.items() if v is not None})
    return EngineConfig.model_validate(data)
