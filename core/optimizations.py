"""Load-time optimizations, applied in one fixed order (documented in README):

  1. dtype                (at load: weights are cast when the pipeline is built/loaded)
  2. attention backend    sdpa | xformers | auto | default
  3. fused QKV            one matmul for Q, K and V
  4. channels_last        UNet + VAE memory format
  5. VAE slicing/tiling
  6. attention slicing
  7. offload              per memory level (core/memory.py)
  8. fp8 / step caching / torch.compile (+ warm-up over the configured shapes, done by the engine); an eager
     UNet's attention processors get their call signature computed once (presign_attention_processors)
"""
from __future__ import annotations

import inspect
import logging
import os
import types

from core.config import MemoryLevel, OptimizationConfig

log = logging.getLogger(__name__)


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401

        return True
    except Exception:  # ImportError, or a build that does not match this torch
        return False


def set_attention(pipe, backend: str, device: str) -> str:
    """Returns the backend actually used."""
    if backend == "auto":
        backend = "xformers" if device.startswith("cuda") and xformers_available() else "sdpa"
    if backend == "xformers":
        if not xformers_available():
            raise RuntimeError("optimization.attention=xformers but xformers is not installed "
                               "(pip install 'sdserve[xformers]') or does not match this torch")
        pipe.enable_xformers_memory_efficient_attention()
    elif backend == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
    return backend


def apply_pre_placement(pipe, opt: OptimizationConfig, device: str) -> dict:
    """Steps 2-6. Returns what was applied, for logs and /v1/models."""
    import torch

    applied = {"attention": set_attention(pipe, opt.attention, device)}
    if opt.fuse_qkv:
        pipe.fuse_qkv_projections()
        applied["fuse_qkv"] = True
    if opt.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        applied["channels_last"] = True
    if opt.vae_slicing:
        pipe.vae.enable_slicing()
        applied["vae_slicing"] = True
    if opt.vae_tiling:
        pipe.vae.enable_tiling()
        applied["vae_tiling"] = True
    if opt.attention_slicing:
        pipe.enable_attention_slicing()
        applied["attention_slicing"] = True
    return applied


# Presigned attention processors. diffusers' Attention.forward runs `inspect.signature(self.processor.__call__)` on
# every call, to drop the cross-attention kwargs its processor does not take: ~15 us of host time per attention call
# on a 2-core CPU box, 140 calls per SDXL UNet forward (experiments/host_overhead.py). inspect.signature returns a
# function's `__signature__` as it is, so a processor whose class's `__call__` carries the signature computed once
# answers at once. The processor's class becomes a subclass of its own whose `__call__` is a copy of the class's
# function (same code, globals, defaults and closure) with `__signature__` set: every computation stays the same, and
# diffusers' own classes are left untouched (a plain diffusers pipeline in the same process is not changed). Dynamo
# traces the copy like the original (compiled engines are not presigned anyway: no host cost per call there).
_PRESIGNED: dict[type, type] = {}


def _presigned_class(cls: type) -> type | None:
    sub = _PRESIGNED.get(cls)
    if sub is None and cls not in _PRESIGNED.values():
        call = cls.__call__
        if not isinstance(call, types.FunctionType) or getattr(call, "__wrapped__", None) is not None:
            return None  # (a decorated or built-in __call__: left alone)
        copy = types.FunctionType(call.__code__, call.__globals__, call.__name__, call.__defaults__,
                                  call.__closure__)
        copy.__kwdefaults__, copy.__qualname__, copy.__doc__ = call.__kwdefaults__, call.__qualname__, call.__doc__
        copy.__signature__ = inspect.signature(call)
        sub = _PRESIGNED[cls] = type(cls.__name__, (cls,), {
            "__call__": copy, "__reduce_ex__": _reduce_presigned, "__module__": cls.__module__,
            "__doc__": f"{cls.__name__} with its __call__ signature computed once (core/optimizations.py)."})
    return sub


def _reduce_presigned(self, protocol):  # pickled and copied as the diffusers class, presigned again when loaded
    return _unpickle_presigned, (type(self).__mro__[1], self.__dict__)


def _unpickle_presigned(cls: type, state: dict):
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    obj.__class__ = _presigned_class(cls) or cls
    return obj


def presign_attention_processors(*models) -> int:
    """Presign the attention processors of `models` (eager engines: see _PRESIGNED's comment). Returns how many
    processors changed class (a processor can be shared by modules; nn.Module processors are left alone)."""
    import torch
    from diffusers.models.attention_processor import Attention

    done = 0
    for model in models:
        for module in model.modules():
            processor = getattr(module, "processor", None) if isinstance(module, Attention) else None
            if processor is None or isinstance(processor, torch.nn.Module) or type(processor) in _PRESIGNED.values():
                continue
            sub = _presigned_class(type(processor))
            if sub is None:
                continue
            try:
                processor.__class__ = sub
            except TypeError:  # (a class with __slots__: another layout than its subclass's)
                continue
            done += 1
    return done


COMPILED_GPU_ENGINE_THREADS = 4


def configure_compile_cache(cache_dir: str) -> str:
    """Inductor's FX-graph/autotune caches in the shared cache dir, so replicas reuse each other's compiles."""
    path = os.path.join(cache_dir, "inductor")
    os.makedirs(path, exist_ok=True)
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:  # Inductor writes its own default into the environment the first time it looks: that is not a choice
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        torch_default = os.path.abspath(default_cache_dir())
    except Exception:  # noqa: BLE001 - private helper; without it only an explicit setting is kept
        torch_default = None
    if current is None or os.path.abspath(current) == torch_default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return path


def compile_kwargs(mode: str) -> dict:
    """torch.compile's arguments for an `optimization.compile` value: a mode of the Inductor backend, or the
    cudagraphs backend (Dynamo's graph replayed as CUDA graphs through the same cudagraph trees as
    reduce-overhead, but with eager kernels: no Inductor/Triton compile at warm-up)."""
    return {"backend": "cudagraphs"} if mode == "cudagraphs" else {"mode": mode}


def apply_compile(pipe, opt: OptimizationConfig, level: MemoryLevel, cache_dir: str) -> dict:
    """Step 8: torch.compile in place (nn.Module.compile keeps the module object, hooks and attributes)."""
    if opt.compile == "none":
        return {}
    if level not in (MemoryLevel.NONE,):
        log.warning("torch.compile skipped: it does not combine with offloading (memory level %s)", level.value)
        return {}
    configure_compile_cache(cache_dir)
    import torch

    if pipe.unet.device.type == "cuda":
        # torch.get_num_threads() is part of Inductor's cache key (cpp_runtime_thread_count): replicas with
        # other Ray num_cpus (OMP_NUM_THREADS) or hosts with other core counts would never share compiled
        # graphs (a warm cache missed in every Serve replica otherwise). A GPU engine's CPU work is tiny.
        torch.set_num_threads(COMPILED_GPU_ENGINE_THREADS)

    # diffusers' SDXL speed recipe; coordinate-descent tuning is left off: minutes more compile for ~2%.
    torch._inductor.config.conv_1x1_as_mm = True
    torch._inductor.config.epilogue_fusion = False
    applied = {"compile": opt.compile}
    if opt.compile == "aoti":  # packages built at warm-up by core/aoti_unet.py (installed by core/fastpath.py)
        return applied
    # dynamic=False: one static graph per batch bucket. Automatic dynamic shapes would turn the second bucket
    # into a batch-symbolic graph: slower kernels, and cache keys that vary with warm-up order.
    # The cudagraphs backend runs eager kernels, so symbolic shapes cost it nothing: automatic dynamic shapes
    # (dynamic=None) trace the UNet again only when another input dimension turns out to vary (rows, width,
    # height: at most 4 graphs), and every later size and bucket shares them (CUDA graphs are still recorded per
    # concrete shape). Tracing the SDXL UNet takes ~15 s: 16 static graphs (4 sizes x 4 buckets) take minutes.
    dynamic = None if opt.compile == "cudagraphs" else False
    pipe.unet.compile(**compile_kwargs(opt.compile), fullgraph=True, dynamic=dynamic)
    # cudagraphs leaves the VAE decoder eager: it runs once per image and is GPU-bound (graph replay saves it
    # nothing), and its AOT graph called native_group_norm on a non-contiguous tensor on CPU (eager group_norm
    # makes it contiguous first).
    if opt.compile_vae and opt.compile != "cudagraphs":
        pipe.vae.decoder.compile(**compile_kwargs(opt.compile), fullgraph=True, dynamic=False)
        applied["compile_vae"] = True
    return applied
