"""Ahead-of-time compiled forwards (optimization.compile_artifacts = "aot"): no Dynamo tracing on a warm start.

With plain torch.compile a replica re-traces the UNet with Dynamo on every start (most of SDXL's warm start:
docs/benchmarks.md, "Cold start") even when Inductor's caches hit. Here `module.forward` is replaced by a dispatcher holding one
`torch.compile(...).aot_compile(...)` function per input shape (batch bucket x size), created during warm-up,
saved under cache_dir/aot and loaded by later processes with `torch.compiler.load_compiled_function`.
Findings behind each workaround: experiments/aot_probe.py and experiments/aot_probe.md.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import tempfile

log = logging.getLogger(__name__)


def guard_filter(entries) -> list[bool]:
    """Dynamo's default aot filter keeps guards whose *derived* types cannot be serialized (saving then fails
    with 'ID_MATCH guard cannot be serialized'); global guards go too (the module's globals are rebound)."""
    try:
        from torch._dynamo.guards import CheckFunctionManager

        bad = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    except Exception:  # noqa: BLE001 - older torch: only the basic rule
        bad = {"ID_MATCH", "CLOSURE_MATCH", "FUNCTION_MATCH", "BUILTIN_MATCH"}
    keep = []
    for g in entries:
        derived = tuple(getattr(g, "derived_guard_types", ()) or ())
        keep.append(not (g.is_global or g.guard_type in bad or any(t in bad for t in derived)))
    return keep


def compile_options(mode: str) -> dict:
    """torch.compile refuses mode= with options=, and guard_filter_fn only goes in options: spell the mode out."""
    import torch

    opts = dict(torch._inductor.list_mode_options(mode)) if mode != "default" else {}
    opts["guard_filter_fn"] = guard_filter
    return opts


def _load(path: str, cudagraphs: bool):
    import torch

    # CUDA graphs are applied at load time iff this flag is set while deserializing.
    with torch._inductor.config.patch({"triton.cudagraphs": cudagraphs}), open(path, "rb") as fh:
        if hasattr(torch.compiler, "load_compiled_function"):
            return torch.compiler.load_compiled_function(fh)
        from torch._dynamo.aot_compile import AOTCompiledFunction  # older spelling

        return AOTCompiledFunction.deserialize(fh.read())


class AotForward:
    """Installed as `module.forward`: the module object (config, dtype, hooks) stays as it is. A shape without a
    function runs eagerly unless `compiling` is set (the engine's warm-up), which loads or compiles one. (A plain
    flag, not a callback into the engine: the module, and so this object, is pickled with the saved function.)"""

    def __init__(self, module, part: str, mode: str, cache_dir: str, key: str):
        import torch

        # diffusers wraps UNet2DConditionModel.forward in @apply_lora_scale, whose closure can be neither guarded
        # nor pickled: the undecorated function is compiled (LoRAs must be fused before, as for compile anyway).
        self.plain = inspect.unwrap(type(module).forward)
        self.eager = functools.partial(self.plain, module)
        self.module, self.part, self.mode, self.key = module, part, mode, key
        self.dir = os.path.join(cache_dir, "aot")
        self.cudagraphs = mode in ("reduce-overhead", "max-autotune")
        self.fns: dict[tuple, object] = {}
        self.compiling = False
        self.loaded = self.compiled = 0
        if hasattr(torch._dynamo.config, "enable_aot_compile"):  # off by default before torch 2.13
            torch._dynamo.config.enable_aot_compile = True

    def path(self, shape: tuple) -> str:
        digest = hashlib.sha256(f"{self.key}|{self.part}|{shape}".encode()).hexdigest()[:24]
        return os.path.join(self.dir, f"{self.part}-{digest}.aot")

    def __call__(self, sample, *args, **kwargs):
        shape = tuple(sample.shape)
        fn = self.fns.get(shape)
        if kwargs.get("down_block_additional_residuals") is not None:  # ControlNet: not what was compiled
            return self.eager(sample, *args, **kwargs)
        if fn is None:
            if not self.compiling:
                return self.eager(sample, *args, **kwargs)
            fn = self.fns[shape] = self._load_or_compile(shape, sample, args, kwargs)
        return fn(self.module, sample, *args, **kwargs)

    def _load_or_compile(self, shape: tuple, sample, args, kwargs):
        import torch

        path = self.path(shape)
        if os.path.exists(path):
            try:
                fn = _load(path, self.cudagraphs)
                self.loaded += 1
                return fn
            except Exception as err:  # noqa: BLE001 - a stale or foreign artifact: compile a fresh one
                log.warning("aot artifact %s unusable (%s: %s); compiling", path, type(err).__name__, err)
        compiled = torch.compile(self.plain, fullgraph=True, dynamic=False, options=compile_options(self.mode))
        fn = compiled.aot_compile(((self.module, sample, *args), kwargs))
        os.makedirs(self.dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir)
        os.close(fd)
        try:
            fn.save_compiled_function(tmp)
            os.replace(tmp, path)  # atomic: replicas sharing the cache dir never read half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.compiled += 1
        if self.cudagraphs:  # the in-process function has no CUDA graphs of its own: use the loaded form
            return _load(path, True)
        return fn


def install(pipe, mode: str, cache_dir: str, key: str, vae: bool) -> list[AotForward]:
    forwards = [AotForward(pipe.unet, "unet", mode, cache_dir, key)]
    pipe.unet.forward = forwards[0]
    if vae:
        forwards.append(AotForward(pipe.vae.decoder, "vae-decoder", mode, cache_dir, key))
        pipe.vae.decoder.forward = forwards[1]
    return forwards


def report(forwards: list[AotForward]) -> dict:
    return {f"aot_{f.part}": {"loaded": f.loaded, "compiled": f.compiled} for f in forwards}
