"""The fast path: compile, fixed shape buckets, fp8 and step caching hooks.

Shape buckets: a compiled UNet (and its CUDA graphs) is specialised per (width, height, rows). UNet calls are
padded up to a row bucket (row_buckets: the image buckets, with and without CFG's doubling), VAE decodes up to an
image bucket; a size that was not warmed up runs eagerly
(`torch.compiler.set_stance("force_eager")`) instead of recompiling in the middle of serving.
"""
from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int, explicit: list[int] | None = None) -> list[int]:
    if explicit:
        return sorted({b for b in explicit if b <= max_batch} | {max_batch})
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def install_fastpath(engine) -> dict:
    """Step 8 of the optimization order: fp8 linears, step caching, torch.compile."""
    from core.optimizations import apply_compile

    opt = engine.config.optimization
    applied: dict = {}
    if opt.fp8:
        from core.fp8 import apply_fp8

        applied.update(apply_fp8(engine.pipe.unet, engine.device, opt.fp8))
    if engine.config.loras is not None:  # after fp8 (its layers get the hooks), before compile (traced with them)
        from core.lora_runtime import LoraRuntime

        engine.lora = LoraRuntime(engine)
        applied["lora_slots"] = engine.config.loras.gpu_slots
    applied.update(apply_compile(engine.pipe, opt, engine.level, engine.config.cache_dir))
    engine.compiled = "compile" in applied
    engine.aoti = None
    if applied.get("compile") == "aoti":  # its folder is set by core/compile_cache.load (named by the key)
        from core import aoti_unet

        engine.aoti = aoti_unet.install(engine)
    if not engine.compiled:
        from core.optimizations import presign_attention_processors

        presign_attention_processors(engine.pipe.unet, *getattr(engine, "controlnets", {}).values())
    engine.step_cache = install_step_cache(engine, applied)
    from core import captured_step

    engine.captured_step = captured_step.install(engine)
    if engine.captured_step is not None:
        applied["capture_step"] = True
    engine.warmed: set[tuple[str, int, int, int]] = set()
    return applied


def install_step_cache(engine, applied: dict):
    """DeepCache-style step caching when configured (after apply_compile: with compile on, it swaps the
    whole-UNet compile for compiled step functions, see core/step_cache.py). Returns the hook or None."""
    cfg = engine.config.optimization.step_cache
    if cfg is None:
        return None
    from core.memory import GROUP_OFFLOAD_LEVELS, offload_strategy

    strategy = offload_strategy(engine.level, engine.config.memory.offload)
    if strategy in (*GROUP_OFFLOAD_LEVELS, "stream") and engine.device.startswith("cuda"):
        # Streamed weights are prefetched in the order of a full forward; a shallow step skips most blocks, so
        # the prefetch chain would break.
        log.warning("step cache skipped: it does not combine with streamed offloading (%s)", strategy)
        applied["step_cache"] = False
        return None
    from core.step_cache import apply_step_cache

    hook = apply_step_cache(engine.pipe.unet, cfg.interval, cfg.first_full_steps, applied.get("compile"))
    applied["step_cache"] = cfg.model_dump()
    return hook


def image_buckets(engine) -> list[int]:
    return batch_buckets(engine.config.limits.max_batch_size, engine.config.optimization.batch_buckets)


def row_buckets(engine) -> list[int]:
    """UNet batch sizes compiled ahead: each image bucket with CFG (two rows per image). Images with guidance <= 1
    take one row and pad up into these (compiled and half idle beats eager); an engine whose default guidance is
    <= 1 (turbo / LCM deployments) also gets the one-row-per-image buckets, so its usual calls are not padded."""
    buckets = image_buckets(engine)
    rows = {2 * b for b in buckets}
    if engine.default_guidance() <= 1:
        rows |= set(buckets)
    return sorted(rows)


def padded(engine, n: int, buckets: list[int] | None = None) -> int:
    """n rows (or images) padded up to their compiled bucket; n itself when not compiled."""
    if not getattr(engine, "compiled", False):
        return n
    return next((b for b in (buckets or image_buckets(engine)) if b >= n), n)


def sdpa_context(engine):
    """Pin the SDPA kernel (cuDNN / flash / efficient / math) for the whole call, warm-up included."""
    backend = engine.config.optimization.sdpa_backend
    if backend == "auto" or not engine.device.startswith("cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
    # Preferred first, the rest as fallbacks: e.g. cuDNN has no kernel for the VAE's single 512-wide head.
    return sdpa_kernel([first] + [b for b in order if b != first], set_priority=True)


@contextlib.contextmanager
def shape_context(engine, part: str, width: int, height: int, batch: int):
    """Kernel choice for one UNet call (part "unet", batch = rows) or VAE decode ("vae", batch = images); during
    warm-up, record compiled shapes; while serving, run unseen shapes eagerly instead of recompiling."""
    with sdpa_context(engine):
        if not getattr(engine, "compiled", False):
            yield
            return
        import torch

        shape = (part, width, height, batch)
        if getattr(engine, "_warming", False):
            engine.warmed.add(shape)
            yield
        elif shape in engine.warmed:
            yield
        else:
            log.info("shape %s was not warmed up: running eagerly instead of recompiling", shape)
            with torch.compiler.set_stance("force_eager"):
                yield
