"""`optimization.compile: aoti`: the UNet as AOTInductor packages, one per warmed call shape, opened without Dynamo.

Why: with torch.compile every process traces the UNet with Dynamo before it can run any compiled code (14-17 s
per SDXL graph on every start, also when Inductor's kernels all come from the artifact store), so a compiled
replica cannot be ready in seconds. AOTInductor compiles ahead of time instead: torch.export captures the UNet's
call at one shape, `aoti_compile_and_package` turns it into a .pt2 package (a shared library with its kernels), and
a later process opens it with `aoti_load_package` in milliseconds and points it at the live module's weights with
`load_constants(..., user_managed=True)` (no copy: the package carries no weights, package_constants_in_so false).

Scope: the UNet's plain call (sample, timestep, encoder_hidden_states and SDXL's added_cond_kwargs) at a shape
built during warm-up. Any other call runs the eager forward: other arguments (ControlNet residuals, timestep_cond,
cross-attention kwargs), a shape that was not warmed (as torch.compile's path does: no compile while serving).
Timesteps enter as float32 (the UNet's sinusoidal embedding converts them to float anyway: integer timesteps of
DDIM-like schedulers give the same values), so one package serves every scheduler. The VAE decoder stays eager.

Packages live in cache_dir/aoti/<compile key>/ (a restart on the same node opens them) and travel between nodes
as one zip blob in the artifact store (core/compile_cache.py). Kernels are launched from the package's C++ wrapper
(no Python per kernel); they are not replayed as CUDA graphs.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable

log = logging.getLogger(__name__)

INDEX = "index.json"  # package file -> the call shape it was built for (human-readable; the file name is its hash)
# Keyword arguments of UNet2DConditionModel.forward the packages take; any other one set means an eager call.
PACKAGED_KWARGS = ("encoder_hidden_states", "added_cond_kwargs", "return_dict")


def plain_call(kwargs: dict) -> bool:
    """True when a UNet call has only the arguments a package takes (others None / empty)."""
    return all(v is None or (k == "cross_attention_kwargs" and not v)
               for k, v in kwargs.items() if k not in PACKAGED_KWARGS)


def call_shape(sample, timestep, hidden, added) -> tuple | None:
    """The call's shape key (what a package is specialised to: a hashable tuple of (input, shape, dtype)), or None
    when the call cannot use a package. Computed on every UNet call: plain tuples, no hashing or JSON."""
    import torch

    if not (torch.is_tensor(timestep) and timestep.ndim == 1 and timestep.shape[0] == sample.shape[0]):
        return None
    if hidden is None or (added is not None and not all(torch.is_tensor(v) for v in added.values())):
        return None
    parts = [("sample", tuple(sample.shape), str(sample.dtype)), ("hidden", tuple(hidden.shape), str(hidden.dtype))]
    parts += [(k, tuple(v.shape), str(v.dtype)) for k, v in sorted((added or {}).items())]
    return tuple(parts)


def shape_from_json(text: str) -> tuple:
    """A shape key back from the index's JSON (lists -> tuples)."""
    return tuple((name, tuple(dims), dtype) for name, dims, dtype in json.loads(text))


def package_name(shape: tuple) -> str:
    return "unet-" + hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16] + ".pt2"


def _plain_call_module(unet):
    """The UNet's original forward as a module for torch.export (the installed dispatcher is bypassed)."""
    import torch

    class PlainCall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, hidden, added):
            return type(self.unet).forward(self.unet, sample, timestep, encoder_hidden_states=hidden,
                                           added_cond_kwargs=added, return_dict=False)[0]

    return PlainCall().eval()


def _add_seconds(totals: dict[str, float], parts) -> None:
    for key, seconds in parts:
        totals[key] = round(totals.get(key, 0.0) + seconds, 3)


class AotiUNet:
    """Replaces `unet.forward`: a plain call of a built shape runs its package, anything else the eager forward.
    `warming()` says whether a missing shape may be built now (during warm-up) or must run eagerly (serving)."""

    def __init__(self, unet, folder: str | None, warming: Callable[[], bool]):
        self.unet, self.folder, self.warming = unet, folder, warming
        self.module = _plain_call_module(unet)
        self.models: dict[tuple, object] = {}  # shape key -> loaded AOTICompiledModel
        self.names: dict[tuple, str] = {}  # shape key -> its package file
        self.built = 0  # packages compiled by this process
        self.eager_calls = 0  # plain calls of shapes without a package while serving
        self.package_calls = 0
        self.open_times: dict[str, float] = {}  # seconds spent opening packages, by part
        self.build_times: dict[str, float] = {}  # seconds spent building them: torch.export, AOTInductor
        unet.forward = self  # instance attribute: nn.Module.__call__ runs it instead of the class's forward

    def __call__(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        import torch

        shape = call_shape(sample, timestep, encoder_hidden_states, kwargs.get("added_cond_kwargs")) \
            if plain_call(kwargs) and not torch.is_grad_enabled() else None
        if shape is not None and shape not in self.models:
            if self.warming():
                self._build(shape, sample, timestep, encoder_hidden_states, kwargs.get("added_cond_kwargs"))
            else:
                self.eager_calls += 1
                shape = None
        if shape is None:
            return type(self.unet).forward(self.unet, sample, timestep, encoder_hidden_states, **kwargs)
        self.package_calls += 1
        out = self.models[shape](sample, timestep.to(torch.float32), encoder_hidden_states,
                                 kwargs.get("added_cond_kwargs"))
        if kwargs.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    def _build(self, shape: tuple, sample, timestep, hidden, added) -> None:
        import torch

        name = package_name(shape)
        t0 = time.perf_counter()
        args = (sample, timestep.to(torch.float32), hidden, added)
        program = torch.export.export(self.module, args, strict=False)
        t1 = time.perf_counter()
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, name)
        tmp = os.path.join(self.folder, f"tmp-{os.getpid()}-{name}")  # (torch wants the .pt2 ending)
        torch._inductor.aoti_compile_and_package(program, package_path=tmp,
                                                 inductor_configs={"aot_inductor.package_constants_in_so": False})
        os.replace(tmp, path)  # whole or absent: a concurrent reader never opens half a package
        self.built += 1
        _add_seconds(self.build_times, (("export_s", t1 - t0), ("compile_s", time.perf_counter() - t1)))
        self._open(name, shape)
        self._write_index()
        log.info("aoti: built %s for %s", name, shape)

    def _open(self, name: str, shape: tuple) -> None:
        t0 = time.perf_counter()
        import torch
        import torch._inductor.package  # (its first import is seconds: timed apart from the package's open)

        t1 = time.perf_counter()
        model = torch._inductor.aoti_load_package(os.path.join(self.folder, name))
        t2 = time.perf_counter()
        tensors = dict(self.module.named_parameters())
        tensors.update(self.module.named_buffers())
        fqns = model.get_constant_fqns()
        missing = [f for f in fqns if f not in tensors]
        if missing:  # a constant the trace created (not a weight): the package cannot run without its own copy
            raise RuntimeError(f"aoti package {name} needs constants the UNet does not hold: {missing[:5]}")
        model.load_constants({f: tensors[f] for f in fqns}, check_full_update=True, user_managed=True)
        self.models[shape], self.names[shape] = model, name
        # where a start's seconds go (the first SDXL run on an H100 spent 39 s opening one package)
        _add_seconds(self.open_times, (("import_s", t1 - t0), ("load_package_s", t2 - t1),
                                       ("load_constants_s", time.perf_counter() - t2)))

    def _write_index(self) -> None:
        tmp = os.path.join(self.folder, f"{INDEX}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({name: json.dumps(shape) for shape, name in self.names.items()}, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(self.folder, INDEX))

    def open_folder(self) -> int:
        """Open every package the folder's index lists (a restart, or a blob just unpacked). Returns how many;
        a package that fails to open is a warning (its shape is built again at warm-up)."""
        try:
            with open(os.path.join(self.folder, INDEX)) as f:
                index = json.load(f)
        except (OSError, ValueError):
            return 0
        for name, text in index.items():
            try:
                shape = shape_from_json(text)
                if shape not in self.models:
                    self._open(name, shape)
            except Exception as err:  # noqa: BLE001 - a stale or foreign package: rebuilt at warm-up
                log.warning("aoti: package %s unusable (%s: %s); built again at warm-up", name, type(err).__name__,
                            err)
        return len(self.models)

    def pack(self) -> bytes:
        """Every package and the index as one zip (stored, not deflated: the libraries barely shrink)."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for name in [*sorted(self.names.values()), INDEX]:
                z.write(os.path.join(self.folder, name), name)
        return buf.getvalue()

    def unpack(self, blob: bytes) -> int:
        """A blob from `pack` into the folder, then opened. Returns the number of packages open."""
        os.makedirs(self.folder, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            names = z.namelist()
            if INDEX not in names or any(os.path.basename(n) != n for n in names):
                raise ValueError("not an sdserve aoti blob")
            for name in names:
                tmp = os.path.join(self.folder, f"{name}.tmp-{os.getpid()}")
                with open(tmp, "wb") as f:
                    f.write(z.read(name))
                os.replace(tmp, os.path.join(self.folder, name))
        return self.open_folder()

    def report(self) -> dict:
        return {"packages": len(self.models), "built": self.built, "package_calls": self.package_calls,
                "eager_calls": self.eager_calls, "open_times": self.open_times,
                "build_times": self.build_times}


def install(engine) -> AotiUNet:
    """The dispatcher on the engine's UNet; core/compile_cache.load gives it its folder before warm-up."""
    return AotiUNet(engine.pipe.unet, None, lambda: bool(getattr(engine, "_warming", False)))
