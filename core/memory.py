"""Memory levels, VRAM budgets, estimates and the per-call memory monitor.

Levels (their SDXL peaks and latencies: docs/benchmarks.md, "Memory levels"):
  NONE        everything resident on the GPU.
  BALANCED    60% of the UNet's bytes (memory.streamed_share; SDXL 50 of its 70 transformer blocks, spread evenly)
              and the CLIP encoder layers streamed from pinned host memory on a side CUDA stream, up to 12 blocks
              ahead of use (core/streaming.py fits it to the fewest device slots: 9): its copies take less time
              than the resident denoising. VAE decode in 512² tiles (SDXL's native 1024² decode alone takes ~2.3 GiB);
              tile seams are blended, so pixels differ slightly from NONE.
  AGGRESSIVE  every transformer block streamed, as far ahead.
  ULTRA       every block, 2 ahead (copy-bound where the big 32² blocks run) + one image at a time through the VAE:
              the lowest peak, also for batches.
  AUTO        the fastest level whose estimated peak fits the VRAM budget (less the allocator's headroom).
memory.offload picks other placements (diffusers' model / group / sequential offloading); memory.fp8_storage
(opt-in) keeps the UNet's streamed weights in fp8: half the pinned host memory and copies, images change.
"""
from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from dataclasses import dataclass

from core.config import BALANCED_SHARE, MemoryConfig, MemoryLevel
from core.stream_slots import GiB, fit_lookahead, module_bytes, slot_count  # noqa: F401 - re-exported

log = logging.getLogger(__name__)
# Fastest first (measured on the H100, docs/benchmarks.md); each level's peak is below the previous one's.
LEVEL_ORDER = (MemoryLevel.NONE, MemoryLevel.BALANCED, MemoryLevel.AGGRESSIVE, MemoryLevel.ULTRA)

# Activation peak per megapixel per image (GiB, fp16, SDPA, batch incl. CFG doubling), by family; the VAE decode
# of the full image dominates. Calibrated on the H100 (benchmarks/results); conservative on purpose.
ACTIVATION_GIB_PER_MPIX = {"sd15": 1.9, "sd21": 2.1, "sdxl": 2.6}
TILED_DECODE_GIB = 0.6  # VAE tiling bounds the decode activations to a tile
STREAM_SLOT_GIB = 0.07  # one device slot of streamed weights: the largest transformer block (1280 channels, SD1.5
# and SDXL: ~65-70 MB); the running block and each one copied ahead take one
LEVEL_LOOKAHEAD = {MemoryLevel.BALANCED: 12, MemoryLevel.AGGRESSIVE: 12, MemoryLevel.ULTRA: 2}
TRANSFORMER_BLOCKS = {"sd15": 16, "sd21": 16, "sdxl": 70}  # streamable blocks per UNet
# UNet share outside its transformer blocks: always resident (SDXL 0.18, SD1.5 0.72)
RESIDENT_WHEN_STREAMING = {"sd15": 0.72, "sd21": 0.72, "sdxl": 0.18}
TEXT_ENCODER_RESIDENT = 0.15  # CLIP's embeddings, final norm and layer slots stay resident when its layers stream
# A budget caps what the caching allocator reserves, and it reserves more than is allocated at once (blocks split
# around live weights; SDXL 1024² reserved up to a third more than it allocated: docs/benchmarks.md, "Memory
# levels"); estimates must fit this share.
ALLOCATOR_HEADROOM = 0.75


@dataclass(frozen=True)
class ModelFootprint:
    """Weight bytes per component in the compute dtype."""

    unet: int
    text_encoders: int
    vae: int
    controlnets: int = 0  # always resident (core/controlnet.py places them on the device at every level)

    @property
    def total(self) -> int:
        return self.unet + self.text_encoders + self.vae + self.controlnets


def footprint_of(pipe) -> ModelFootprint:
    te = module_bytes(getattr(pipe, "text_encoder", None)) + module_bytes(getattr(pipe, "text_encoder_2", None))
    return ModelFootprint(unet=module_bytes(pipe.unet), text_encoders=te, vae=module_bytes(pipe.vae))


def level_share(level: MemoryLevel, balanced_share: float) -> float:
    """Share of the UNet's weight bytes streamed per call: BALANCED's setting (memory.streamed_share), every
    transformer block below it (the share is capped at what the transformer blocks hold)."""
    return balanced_share if level == MemoryLevel.BALANCED else 1.0


def stream_slots(family: str, level: MemoryLevel, share: float, lookahead: int | None = None) -> int:
    """Device slots the UNet's weight streamer takes (as core.streaming sizes them)."""
    fixed = RESIDENT_WHEN_STREAMING.get(family, 0.18)
    streamed = round(TRANSFORMER_BLOCKS.get(family, 70) * min(1.0, share / (1 - fixed)))
    return slot_count(streamed, fit_lookahead(streamed, lookahead or LEVEL_LOOKAHEAD.get(level, 2)))


def estimate_peak_bytes(fp: ModelFootprint, family: str, level: MemoryLevel, width: int, height: int,
                        batch: int, streamed_share: float = BALANCED_SHARE, lookahead: int | None = None) -> int:
    """Estimated peak allocated VRAM for one pipeline call at `level` (CFG on; BALANCED streams
    `streamed_share` of the UNet's weight bytes; `lookahead`: memory.stream_lookahead)."""
    mpix = width * height / 1e6
    per_img = ACTIVATION_GIB_PER_MPIX.get(family, 2.6) * mpix * GiB
    if level == MemoryLevel.NONE:
        return int(fp.total + per_img * batch)
    unet_act = 0.25 * per_img * batch  # the untiled decode is most of NONE's activation peak
    decode = 0.75 * per_img * batch
    share = level_share(level, streamed_share)
    slots = STREAM_SLOT_GIB * GiB * stream_slots(family, level, share, lookahead)
    resident = (fp.unet * max(1 - share, RESIDENT_WHEN_STREAMING.get(family, 0.18)) + fp.vae + fp.controlnets
                + TEXT_ENCODER_RESIDENT * fp.text_encoders + slots)
    if level == MemoryLevel.ULTRA:  # 512² tiles, one image at a time
        decode = min(decode / batch, TILED_DECODE_GIB * GiB)
    else:  # 512² tiles, the whole batch per tile
        decode = min(decode, TILED_DECODE_GIB * GiB * batch)
    return int(resident + unet_act + decode)


def usable(budget_bytes: int) -> int:
    """What estimates may take of a budget (the rest: the allocator's split blocks, see ALLOCATOR_HEADROOM)."""
    return int(budget_bytes * ALLOCATOR_HEADROOM)


def pick_level(fp: ModelFootprint, family: str, budget_bytes: int | None, width: int, height: int,
               batch: int = 1, streamed_share: float = BALANCED_SHARE, lookahead: int | None = None) -> MemoryLevel:
    """AUTO: the fastest level whose estimate fits the budget (the smallest estimate when nothing fits)."""
    if budget_bytes is None:
        return MemoryLevel.NONE
    for level in LEVEL_ORDER:
        if estimate_peak_bytes(fp, family, level, width, height, batch, streamed_share, lookahead) <= usable(
                budget_bytes):
            return level
    return min(LEVEL_ORDER, key=lambda lv: estimate_peak_bytes(fp, family, lv, width, height, batch, streamed_share,
                                                               lookahead))


def max_batch_within(fp: ModelFootprint, family: str, level: MemoryLevel, budget_bytes: int | None,
                     width: int, height: int, cap: int, streamed_share: float = BALANCED_SHARE,
                     lookahead: int | None = None) -> int:
    """Largest batch (<= cap) whose estimate fits the budget; 0 when even one image does not fit."""
    if budget_bytes is None:
        return cap
    best = 0
    for b in range(1, cap + 1):
        if estimate_peak_bytes(fp, family, level, width, height, b, streamed_share, lookahead) > usable(budget_bytes):
            break
        best = b
    return best


def total_vram_bytes(device: str) -> int | None:
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory


# Each process's CUDA context (and the driver's per-process state) lives outside the caching allocator the
# budget caps: four 0.25 replicas at full budget would otherwise overcommit the GPU by four contexts.
CONTEXT_RESERVE = int(0.75 * 1024**3)


def fraction_budget(total: int, gpu_fraction: float) -> int:
    """Budget of a replica owning `gpu_fraction` of a GPU with `total` bytes (less its context if it shares)."""
    return int(total * gpu_fraction) - (CONTEXT_RESERVE if gpu_fraction < 1 else 0)


def budget_bytes(cfg: MemoryConfig, device: str) -> int | None:
    """The replica's VRAM budget: explicit GiB, else gpu_fraction x total VRAM (less one CUDA context when the
    GPU is shared); None on CPU."""
    total = total_vram_bytes(device)
    if cfg.vram_budget_gib is not None:
        return int(cfg.vram_budget_gib * GiB)
    if total is None:
        return None
    return fraction_budget(total, cfg.gpu_fraction)


def enforce_budget(cfg: MemoryConfig, device: str) -> int | None:
    """Cap this process's CUDA caching allocator at the budget, so a replica cannot take its neighbour's memory."""
    import torch

    budget, total = budget_bytes(cfg, device), total_vram_bytes(device)
    if budget is None or total is None or not cfg.enforce_budget:
        return budget
    fraction = min(1.0, budget / total)
    torch.cuda.set_per_process_memory_fraction(fraction, torch.device(device))
    log.info("VRAM budget %.2f GiB (%.0f%% of %.1f GiB) enforced", budget / GiB, fraction * 100, total / GiB)
    return budget


LEVEL_OFFLOAD = {MemoryLevel.BALANCED: "stream", MemoryLevel.AGGRESSIVE: "stream", MemoryLevel.ULTRA: "stream"}
GROUP_OFFLOAD_LEVELS = ("group-block", "group-leaf")
STREAMED_STRATEGIES = ("stream", "group-block", "group-leaf", "sequential")  # weights copied in every UNet call
SMALL_TILE_PX = 512  # levels below NONE decode in tiles of this size even at SDXL's native 1024² (blended seams)


def offload_strategy(level: MemoryLevel, offload: str = "auto") -> str | None:
    """The placement strategy for `level` (None: fully resident)."""
    if level in (MemoryLevel.NONE, MemoryLevel.AUTO):
        return None
    return LEVEL_OFFLOAD[level] if offload == "auto" else offload


def apply_level(pipe, level: MemoryLevel, device: str, dtype, mem: MemoryConfig | None = None) -> list:
    """Place the pipeline according to `level` (the offload step of the optimization order). Returns the weight
    streamers installed (offload=stream), for their byte counts."""
    import torch

    mem = mem or MemoryConfig()
    if not device.startswith("cuda"):
        if level not in (MemoryLevel.NONE, MemoryLevel.AUTO):
            log.warning("memory level %s has no effect on %s (CUDA-only); running fully resident", level.value, device)
        pipe.to(device)
        return []
    strategy = offload_strategy(level, mem.offload)
    if strategy is None:
        pipe.to(device)
        return []
    # Every level below NONE decodes in 512² tiles, also at the VAE's native size (SDXL 1024²: ~2.3 GiB of decode
    # activations otherwise, more than the rest of the call); ULTRA one image at a time. Attention slicing is never
    # used: SDPA keeps attention memory linear, slicing only slows it.
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size = min(pipe.vae.tile_sample_min_size, SMALL_TILE_PX)
    pipe.vae.tile_latent_min_size = min(pipe.vae.tile_latent_min_size, SMALL_TILE_PX // 8)
    if level == MemoryLevel.ULTRA:
        pipe.vae.enable_slicing()
    fp8 = mem.fp8_storage and dtype in (torch.float16, torch.bfloat16)
    onload, offload_to = torch.device(device), torch.device("cpu")
    if strategy == "stream":  # UNet transformer blocks and CLIP layers streamed from pinned memory, rest resident
        from core.streaming import stream_text_encoder, stream_unet_share

        streamers = [stream_text_encoder(enc, onload) for enc in (getattr(pipe, "text_encoder", None),
                                                                  getattr(pipe, "text_encoder_2", None)) if enc]
        streamers.append(stream_unet_share(pipe.unet, onload, level_share(level, mem.streamed_share),
                                           mem.stream_lookahead or LEVEL_LOOKAHEAD[level], store_fp8=fp8))
        pipe.vae.to(onload)
        return [s for s in streamers if s is not None]
    if fp8:  # fp8 storage of all UNet weights (upcast per layer at compute): half the bytes, images change
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    if strategy == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif strategy == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif strategy == "group-leaf":
        pipe.enable_group_offload(onload_device=onload, offload_device=offload_to, offload_type="leaf_level",
                                  use_stream=True)
    else:  # group-block: every transformer block / resnet is a group, the next one prefetched on a side stream
        apply_block_streaming(pipe, onload, offload_to, use_stream=True)
    return []


# diffusers' default block grouping makes each of the UNet's down/up blocks one group (SDXL: up to ~2 GB), too coarse
# for the copies to overlap the compute (several times slower than resident). Recursing into these children
# (block_modules) makes every transformer block, resnet and sampler its own group, each copy prefetched while the
# previous group computes (a third of that time: experiments/benchmark-history.md).
UNET_BLOCK_MODULES = ["down_blocks", "mid_block", "up_blocks", "attentions", *map(str, range(8))]
TEXT_ENCODER_BLOCK_MODULES = ["text_model", "encoder"]  # CLIP: one group per encoder layer


def apply_block_streaming(pipe, onload, offload_to, use_stream: bool) -> None:
    """Fine-grained streamed group offloading (diffusers) of the UNet and text encoders; the VAE stays resident (it
    runs once per call)."""
    from diffusers.hooks import apply_group_offloading

    kwargs = dict(onload_device=onload, offload_device=offload_to, offload_type="block_level",
                  num_blocks_per_group=1, use_stream=use_stream, record_stream=use_stream)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            with one_prefetch_chain(model):
                apply_group_offloading(model, block_modules=UNET_BLOCK_MODULES if name == "unet"
                                       else TEXT_ENCODER_BLOCK_MODULES, **kwargs)
    pipe.vae.to(onload)


@contextmanager
def one_prefetch_chain(top):
    """diffusers 0.42 gives every nested block module (block_modules recursion) its own lazy-prefetch hook when
    streams are on, and the outer hook then fails registering its execution tracker a second time ("Hook with name
    layer_execution_tracker already exists"). Only the top module needs one: it traces every group hook below it,
    nested ones included, and chains their prefetches in execution order. Nested modules get the plain group hook."""
    import diffusers.hooks.group_offloading as go

    lazy = go._apply_lazy_group_offloading_hook

    def only_top(module, group, *, config):
        if module is top:
            return lazy(module, group, config=config)
        return go._apply_group_offloading_hook(module, group, config=config)

    go._apply_lazy_group_offloading_hook = only_top
    try:
        yield
    finally:
        go._apply_lazy_group_offloading_hook = lazy


class MemoryMonitor:
    """Peak VRAM per call. Cached blocks stay cached between calls at every level: handing them back after each call
    (gc + empty_cache) cost ULTRA measurable latency (SDXL, timed in turns), and under an enforced
    budget the allocator frees its cache by itself before it fails an allocation."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.last_peak: int | None = None

    @contextmanager
    def track(self):
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield self
        finally:
            if self.cuda:
                self.last_peak = int(torch.cuda.max_memory_allocated(self.device))


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
