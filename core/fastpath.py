"""The fast path: compile, fixed shape buckets, fp8 and step caching hooks.

Shape buckets: a compiled UNet (and its CUDA graphs) is specialised per (width, height, batch). Batches are
padded up to a power-of-two bucket, and a size that was not warmed up runs eagerly
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
    applied.update(apply_compile(engine.pipe, opt, engine.level, engine.config.cache_dir))
    engine.compiled = "compile" in applied
    engine.step_cache = install_step_cache(engine, applied)
    if engine.compiled:
        from core import compile_cache

        applied["compile_cache_hit"] = compile_cache.load(engine)
        if applied.get("compile_artifacts") == "aot":
            from core import aot_forward

            engine.aot_forwards = aot_forward.install(engine.pipe, opt.compile, engine.config.cache_dir,
                                                      compile_cache.cache_key(engine), opt.compile_vae)
    engine.warmed: set[tuple[int, int, int]] = set()
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


def bucket_samples(engine, samples: list) -> list:
    """Pad a chunk to its batch bucket when compiled (the padding's outputs are dropped)."""
    if not getattr(engine, "compiled", False):
        return samples
    target = next(b for b in batch_buckets(engine.config.limits.max_batch_size,
                                        engine.config.optimization.batch_buckets) if b >= len(samples))
    return samples + [samples[-1]] * (target - len(samples))


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
def shape_context(engine, width: int, height: int, batch: int):
    """Kernel choice for the call; during warm-up, record compiled shapes; while serving, run unseen shapes eagerly.
    Also starts the step cache's count afresh: each pipeline call begins with full UNet steps."""
    if getattr(engine, "step_cache", None) is not None:
        engine.step_cache.reset()
    with sdpa_context(engine):
        if not getattr(engine, "compiled", False):
            yield
            return
        import torch

        shape = (width, height, batch)
        if getattr(engine, "_warming", False):
            engine.warmed.add(shape)
            yield
        elif shape in engine.warmed:
            yield
        else:
            log.info("shape %s was not warmed up: running eagerly instead of recompiling", shape)
            with torch.compiler.set_stance("force_eager"):
                yield
