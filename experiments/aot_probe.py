"""Probe: can a compiled UNet / VAE decoder be saved ahead of time and loaded in a fresh process without Dynamo
re-tracing it (the ~15 s `bytecode_tracing` of every warm start, docs/benchmarks.md "Cold start")?

    python3 -m experiments.aot_probe --out /tmp/aot.json                       # CPU: tiny-sd + tiny-sdxl
    source .gpuhost/install.sh; python3 -m experiments.aot_probe --model sdxl --out $OUT/aot.json   # GPU host

A probe, not product code. For each model / part (unet, vae = VAE decoder) / compile mode it runs, each step in
a FRESH subprocess with its own empty Inductor/Triton cache dir:
  1. compile: build the pipeline (engine-like: SDPA, fused QKV, channels_last, the engine's Inductor flags),
     capture the exact call the diffusers pipeline makes (a forward pre-hook on the UNet during a real pipeline
     call: batch 2 = CFG at the model's default size), then
     `torch.compile(forward, fullgraph=True, dynamic=False, options=...).aot_compile(((module, *args), kwargs))`
     and `save_compiled_function` (timings, size, counters, which guards had to be dropped);
  2. load (fresh process, fresh cache dir, weights built again = another module instance):
     `torch.compiler.load_compiled_function` -> load time, first call, steady call, guard-check cost, max abs
     difference vs eager; which inputs the loaded function needs and whether the weights are baked in (a copy of
     the module with changed weights is passed); which guard changes make it refuse (batch, grad mode, layout,
     unfused QKV); plugging it into the pipeline (an instance-level `module.forward` that dispatches by input
     shape, 2-step pipeline vs eager); where the load time goes (kernels vs guards); on CUDA whether CUDA graphs
     are kept (mode="reduce-overhead", loaded with and without triton.cudagraphs) and a hand-made
     torch.cuda.CUDAGraph around the call of a default-mode artifact;
  3. load again in another process with the now-populated cache dir (a second replica on the same host);
plus a few cheap reproductions (backend aot_eager) of the errors met on the way, and AOTInductor
(torch.export + aoti_compile_and_package / aoti_load_package) when aot_compile fails (--aoti auto) or always
(--aoti on). Every step's result (or full error) goes into one JSON report, rewritten after each step, so a run
cut short by --budget-s or a timeout still leaves what it measured.
"""
from __future__ import annotations

import argparse
import copy
import functools
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("tiny-sd", "tiny-sdxl")
# Guard types Dynamo cannot serialize (torch/_dynamo/guards.py CheckFunctionManager); the fallback is 2.13's list.
_UNSERIALIZABLE_FALLBACK = ("DICT_VERSION", "NN_MODULE", "ID_MATCH", "FUNCTION_MATCH", "CLASS_MATCH",
                            "MODULE_MATCH", "CLOSURE_MATCH", "WEAKREF_ALIVE")


# --------------------------------------------------------------------------------------------- child helpers

def _err(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()[-6000:]}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _setup(spec: dict) -> None:
    import torch

    if hasattr(torch._dynamo.config, "enable_aot_compile"):  # off by default before 2.13
        torch._dynamo.config.enable_aot_compile = True
    # The engine's Inductor flags (core/optimizations.py apply_compile).
    torch._inductor.config.conv_1x1_as_mm = True
    torch._inductor.config.epilogue_fusion = False
    if spec["device"].startswith("cuda"):
        from core.optimizations import COMPILED_GPU_ENGINE_THREADS

        torch.set_num_threads(COMPILED_GPU_ENGINE_THREADS)


def _build(spec: dict, seed: int = 0):
    import torch

    from core.embedded import build_pipeline

    pipe = build_pipeline(spec["model"], seed, device=spec["device"], dtype=getattr(torch, spec["dtype"]))
    pipe.set_progress_bar_config(disable=True)
    if spec["engine_opts"]:  # sdserve's best settings (benchmarks/cold_start.py BEST), before compiling
        from core.config import OptimizationConfig
        from core.optimizations import apply_pre_placement

        apply_pre_placement(pipe, OptimizationConfig(attention="sdpa", fuse_qkv=True, channels_last=True),
                            spec["device"])
    pipe.unet.eval()
    pipe.vae.eval()
    return pipe


class _Stop(Exception):
    pass


def _size(pipe) -> int:
    s = pipe.unet.config.sample_size
    return (s if isinstance(s, int) else s[0]) * pipe.vae_scale_factor


def _pipe_call(pipe, spec: dict, steps: int, seed: int = 0):
    import torch

    n, size = spec["batch"], _size(pipe)
    return pipe(prompt=["an aot probe"] * n, negative_prompt=[""] * n, width=size, height=size,
                num_inference_steps=steps, guidance_scale=5.0,
                generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
                output_type="latent").images


def _capture(pipe, spec: dict, part: str):
    """(module, args, kwargs) exactly as the pipeline / the engine's VAE decode calls the compiled module."""
    import torch

    module = pipe.unet if part == "unet" else pipe.vae.decoder
    cap = {}

    def hook(_m, args, kwargs):
        cap["args"], cap["kwargs"] = args, kwargs
        raise _Stop

    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            if part == "unet":
                _pipe_call(pipe, spec, steps=1)
            else:  # core/gpu_stage.decode_latents: vae.decode(latents / scaling_factor)
                size = _size(pipe) // pipe.vae_scale_factor
                g = torch.Generator("cpu").manual_seed(0)
                z = torch.randn(spec["batch"], pipe.vae.config.latent_channels, size, size, generator=g)
                z = z.to(device=spec["device"], dtype=pipe.vae.dtype) / pipe.vae.config.scaling_factor
                pipe.vae.decode(z, return_dict=False)
    except _Stop:
        pass
    finally:
        h.remove()

    def clone(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, dict):
            return {k: clone(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(clone(v) for v in x)
        return x

    return module, clone(tuple(cap["args"])), clone(dict(cap["kwargs"]))


def _describe(x):
    import torch

    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} {x.device.type}" + (
            " channels_last" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous() else "")
    if isinstance(x, dict):
        return {k: _describe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_describe(v) for v in x]
    return repr(x)


def _ctx(part: str):
    """Grad mode for compiling and calling. The pipeline __call__ is @torch.no_grad(). The engine decodes under
    torch.inference_mode() (core/gpu_stage.decode_latents), but a function aot-compiled under inference_mode fails
    its guards once saved and loaded ("dispatch key set mismatch", see stage_repro), and one compiled under
    no_grad refuses inference tensors: the VAE decoder is compiled and called under no_grad too."""
    import torch

    return torch.no_grad()


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _maxdiff(a, b) -> float:
    return float((a.float() - b.float()).abs().max().item())


def _timed(fn, device: str, n: int) -> dict:
    ts = []
    for _ in range(n):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return {"median_s": round(statistics.median(ts), 6), "min_s": round(min(ts), 6), "n": n}


def _plain_forward(module):
    """The module's forward as a plain function taking the module as its first argument. diffusers wraps
    UNet2DConditionModel.forward in @apply_lora_scale, whose closure (`forward_fn`) can be neither guarded
    (CLOSURE_MATCH) nor pickled: the undecorated function is compiled (the wrapper only scales PEFT LoRA layers)."""
    return inspect.unwrap(type(module).forward)


def _guard_filter(stats: dict):
    """Dynamo's default filter for aot_compile drops global guards and unserializable guard *types*, but not
    guards whose *derived* types are unserializable (BUILTIN_MATCH -> ID_MATCH...): saving then fails with
    'PackageError: ID_MATCH guard cannot be serialized.' This one drops those too and counts what it did."""
    try:
        from torch._dynamo.guards import CheckFunctionManager

        bad = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    except Exception:  # noqa: BLE001 - older torch
        bad = set(_UNSERIALIZABLE_FALLBACK)
    stats.update(kept={}, dropped_global=0, dropped_local=[])

    def fn(entries):
        keep = []
        for g in entries:
            derived = tuple(getattr(g, "derived_guard_types", ()) or ())
            unser = g.guard_type in bad or any(t in bad for t in derived)
            if g.is_global:
                stats["dropped_global"] += 1
            elif unser:
                stats["dropped_local"].append(f"{g.name}: {g.guard_type}{list(derived)}")
            else:
                stats["kept"][g.guard_type] = stats["kept"].get(g.guard_type, 0) + 1
            keep.append(not (g.is_global or unser))
        return keep

    return fn


def _compile_options(mode: str, filt) -> dict:
    """torch.compile refuses mode= together with options= ('Either mode or options can be specified, but both
    can't be specified at the same time.') and guard_filter_fn only goes in options: the mode's Inductor options
    are spelled out (reduce-overhead = {'triton.cudagraphs': True})."""
    import torch

    opts = dict(torch._inductor.list_mode_options(mode)) if mode != "default" else {}
    opts["guard_filter_fn"] = filt
    return opts


def _counters() -> dict:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return {}
    out = {}
    for group in ("inductor", "aot_autograd", "stats"):
        for k, v in counters[group].items():
            if v and ("cache" in k or "cudagraph" in k or k in ("unique_graphs", "calls_captured")):
                out[f"{group}.{k}"] = v
    return out


def _load_fn_from(fh):
    import torch

    if hasattr(torch.compiler, "load_compiled_function"):
        return torch.compiler.load_compiled_function(fh)
    from torch._dynamo.aot_compile import AOTCompiledFunction  # older spelling

    return AOTCompiledFunction.deserialize(fh.read())


def _load_fn(path: str):
    with open(path, "rb") as fh:
        return _load_fn_from(fh)


def _cudagraph_state(device: str) -> dict:
    if not device.startswith("cuda"):
        return {}
    import torch

    try:
        from torch._inductor import cudagraph_trees

        mgr = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        out = {"tree_manager": mgr is not None}
        if mgr is not None:
            out["root_graphs"] = sum(len(v) for v in getattr(mgr, "roots", {}).values())
        return out
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)}


# --------------------------------------------------------------------------------------------- child stages

def stage_compile(spec: dict) -> dict:
    import torch

    _setup(spec)
    res: dict = {}
    t = time.perf_counter()
    pipe = _build(spec)
    res["build_s"] = round(time.perf_counter() - t, 3)
    module, args, kwargs = _capture(pipe, spec, spec["part"])
    res["call"] = {"args": _describe(args), "kwargs": _describe(kwargs)}
    with _ctx(spec["part"]):
        ref = _first(module(*args, **kwargs)).clone()
    stats: dict = {}
    fwd = _plain_forward(module)
    res["compiled_function"] = f"{fwd.__module__}.{fwd.__qualname__} (module passed as first argument)"
    compiled = torch.compile(fwd, fullgraph=True, dynamic=False, options=_compile_options(spec["mode"],
                                                                                          _guard_filter(stats)))
    if not hasattr(compiled, "aot_compile"):
        raise RuntimeError(f"torch {torch.__version__}: the torch.compile wrapper has no aot_compile")
    t = time.perf_counter()
    with _ctx(spec["part"]):
        fn = compiled.aot_compile(((module, *args), kwargs))
    res["aot_compile_s"] = round(time.perf_counter() - t, 3)
    res["guards"] = {"kept_by_type": stats["kept"], "kept": sum(stats["kept"].values()),
                     "dropped_global": stats["dropped_global"], "dropped_local": stats["dropped_local"]}
    res["counters_after_compile"] = _counters()
    with _ctx(spec["part"]):
        _sync(spec["device"])
        t = time.perf_counter()
        out = _first(fn(module, *args, **kwargs))
        _sync(spec["device"])
        res["in_process_first_call_s"] = round(time.perf_counter() - t, 4)
        res["in_process_max_abs_diff_vs_eager"] = _maxdiff(out, ref)
    t = time.perf_counter()
    fn.save_compiled_function(spec["artifact"])
    res["save_s"] = round(time.perf_counter() - t, 3)
    res["artifact_bytes"] = os.path.getsize(spec["artifact"])
    torch.save({"args": args, "kwargs": kwargs, "ref": ref.cpu()}, spec["inputs"])
    res["cudagraphs"] = _cudagraph_state(spec["device"])
    return res


def _guard_reason(fn, module, args, kwargs) -> str:
    try:
        f_locals = fn.prepare_f_locals(module, *args, **kwargs)
        info = fn._artifacts.guard_manager.check_verbose(f_locals)
        return "; ".join(getattr(info, "verbose_code_parts", []) or [str(info)])[:600]
    except Exception as e:  # noqa: BLE001
        return f"(reason unavailable: {e!r})"


def _neg_guard_checks(spec, fn, module, args, kwargs) -> dict:
    """Which changes the loaded function refuses (guard_check -> False) rather than silently mis-computing."""
    import torch

    out = {}

    def check(name, m, a, k, ctx=None):
        try:
            with (ctx or _ctx(spec["part"])):  # the reason too: it is the first failing guard in this context
                ok = bool(fn.guard_check(m, *a, **k))
                out[name] = {"passes": ok} if ok else {"passes": False, "reason": _guard_reason(fn, m, a, k)}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"[:600]}

    big = torch.cat([args[0], args[0][:1]])  # one more sample: another batch bucket
    check("batch+1", module, (big,) + tuple(args[1:]), kwargs)
    check("grad_enabled", module, args, kwargs, ctx=torch.enable_grad())
    if spec["part"] == "unet":
        check("return_dict=True", module, args, {**kwargs, "return_dict": True})
    if spec["engine_opts"]:  # one copy at a time (SDXL's UNet is 5 GB in fp16)
        m3 = copy.deepcopy(module)
        m3.to(memory_format=torch.contiguous_format)
        check("weights_contiguous_not_channels_last", m3, args, kwargs)
        del m3
        if hasattr(module, "unfuse_qkv_projections"):
            m3 = copy.deepcopy(module)
            try:
                m3.unfuse_qkv_projections()
                check("qkv_unfused", m3, args, kwargs)
            except Exception as e:  # noqa: BLE001
                out["qkv_unfused"] = {"error": repr(e)}
            del m3
    return out


class _LoadTimer:
    """Splits load_compiled_function's time: rebuilding the compiled graph (AOTAutograd/Inductor post-compile:
    writing/compiling/loading kernels) and rebuilding the guard manager (thousands of guards for a UNet)."""

    TARGETS = (("torch._functorch._aot_autograd.aot_autograd_result", "deserialize_bundled_cache_entry",
                "compiled_graph_s"), ("torch._dynamo.package", "load_guard_manager", "guard_manager_s"))

    def __enter__(self):
        import importlib

        self.times, self.saved = {}, []
        for mod_name, attr, key in self.TARGETS:
            try:
                mod = importlib.import_module(mod_name)
                orig = getattr(mod, attr)
            except Exception:  # noqa: BLE001 - other torch versions: no split
                continue

            def timed(*a, _orig=orig, _key=key, **k):
                t = time.perf_counter()
                try:
                    return _orig(*a, **k)
                finally:
                    self.times[_key] = round(self.times.get(_key, 0.0) + time.perf_counter() - t, 3)

            setattr(mod, attr, timed)
            self.saved.append((mod, attr, orig))
        return self

    def __exit__(self, *exc):
        for mod, attr, orig in self.saved:
            setattr(mod, attr, orig)
        return False


def stage_load(spec: dict) -> dict:
    import torch

    _setup(spec)
    dev = spec["device"]
    res: dict = {}
    t = time.perf_counter()
    pipe = _build(spec)  # a fresh module instance; weights from the same seed
    res["build_s"] = round(time.perf_counter() - t, 3)
    module = pipe.unet if spec["part"] == "unet" else pipe.vae.decoder
    data = torch.load(spec["inputs"], map_location=dev, weights_only=False)
    args, kwargs = tuple(data["args"]), data["kwargs"]
    cudagraphs = dev.startswith("cuda") and spec["mode"] in ("reduce-overhead", "max-autotune")
    res["load_with_inductor_triton_cudagraphs"] = cudagraphs
    t = time.perf_counter()
    # Deserializing applies cudagraphs iff torch._inductor.config.triton.cudagraphs is set NOW
    # (torch/_functorch/_aot_autograd/aot_autograd_result.py deserialize_bundled_cache_entry).
    with torch._inductor.config.patch({"triton.cudagraphs": cudagraphs}), _LoadTimer() as lt:
        fn = _load_fn(spec["artifact"])
    res["load_s"] = round(time.perf_counter() - t, 3)
    res["load_split"] = lt.times
    with _ctx(spec["part"]):
        eager = _first(module(*args, **kwargs)).clone()
        _sync(dev)
        t = time.perf_counter()
        out = _first(fn(module, *args, **kwargs)).clone()
        _sync(dev)
        res["first_call_s"] = round(time.perf_counter() - t, 4)
        res["max_abs_diff_vs_eager"] = _maxdiff(out, eager)
        res["max_abs_diff_vs_compile_process_eager"] = _maxdiff(out.cpu(), data["ref"])
        res["steady_call"] = _timed(lambda: fn(module, *args, **kwargs), dev, spec["iters"])
        res["eager_call"] = _timed(lambda: module(*args, **kwargs), dev, spec["iters"])
        try:  # the per-call cost of the guards, and a call without them
            res["guard_check"] = _timed(lambda: fn.guard_check(module, *args, **kwargs), "cpu", 20)
            fn.disable_guard_check()
            res["steady_call_guards_off"] = _timed(lambda: fn(module, *args, **kwargs), dev, spec["iters"])
            fn._guard_check_enabled = True
        except Exception as e:  # noqa: BLE001
            res["guard_check"] = {"error": _err(e)}
    res["cudagraphs"] = _cudagraph_state(dev)
    res["counters"] = _counters()
    if spec.get("quick"):
        return res

    # Weights: pass another instance whose weights differ. If the output follows that instance's eager output,
    # the weights are read from the module passed at call time (graph inputs), not baked into the artifact.
    try:
        m2 = copy.deepcopy(module)
        with torch.no_grad():
            for p in m2.parameters():
                p.mul_(1.05)
        with _ctx(spec["part"]):
            e2 = _first(m2(*args, **kwargs)).clone()
            o2 = _first(fn(m2, *args, **kwargs)).clone()
        res["other_instance_changed_weights"] = {
            "guards_pass": True, "max_abs_diff_vs_its_eager": _maxdiff(o2, e2),
            "max_abs_diff_vs_original_eager": _maxdiff(o2, eager),
            "weights_from_call_module": _maxdiff(o2, e2) < 0.1 * max(_maxdiff(e2, eager), 1e-12)}
        del m2, e2, o2
    except Exception as e:  # noqa: BLE001
        res["other_instance_changed_weights"] = {"error": _err(e)}
    res["guard_refusals"] = _neg_guard_checks(spec, fn, module, args, kwargs)
    res["pipeline"] = _plug_in(spec, pipe, module, fn)
    if dev.startswith("cuda"):
        if not cudagraphs:  # (a cudagraph-tree function cannot be captured inside another graph)
            res["manual_cuda_graph"] = _manual_cuda_graph(lambda: fn(module, *args, **kwargs), eager, spec)
        # The same artifact loaded with the opposite cudagraphs setting.
        try:
            with torch._inductor.config.patch({"triton.cudagraphs": not cudagraphs}):
                fn2 = _load_fn(spec["artifact"])
            with _ctx(spec["part"]):
                o = _first(fn2(module, *args, **kwargs)).clone()
                res["load_opposite_cudagraphs"] = {
                    "triton.cudagraphs": not cudagraphs, "max_abs_diff_vs_eager": _maxdiff(o, eager),
                    "steady_call": _timed(lambda: fn2(module, *args, **kwargs), dev, spec["iters"])}
        except Exception as e:  # noqa: BLE001
            res["load_opposite_cudagraphs"] = {"triton.cudagraphs": not cudagraphs, "error": _err(e)}
    return res


class CompiledForward:
    """What the engine would install: module.forward replaced by the loaded function, the module object (config,
    dtype, device, add_embedding, hooks) left as it is. Dispatch by input shape = one loaded function per
    (batch bucket, size); an unknown shape falls back to the eager forward."""

    def __init__(self, module, fns: dict):
        self.module, self.fns = module, fns
        self.eager = functools.partial(inspect.unwrap(type(module).forward), module)

    def __call__(self, sample, *args, **kwargs):
        fn = self.fns.get(tuple(sample.shape))
        if fn is None:
            return self.eager(sample, *args, **kwargs)
        return fn(self.module, sample, *args, **kwargs)


def _plug_in(spec, pipe, module, fn) -> dict:
    import torch

    out: dict = {}
    part = spec["part"]
    try:
        if part == "unet":
            ref = _pipe_call(pipe, spec, steps=2).clone()
            shape = (2 * spec["batch"], pipe.unet.config.in_channels) + tuple(ref.shape[-2:])
        else:
            size = _size(pipe) // pipe.vae_scale_factor
            z = torch.randn(spec["batch"], pipe.vae.config.latent_channels, size, size,
                            generator=torch.Generator("cpu").manual_seed(1))
            z = z.to(device=spec["device"], dtype=pipe.vae.dtype)
            with _ctx(part):
                ref = pipe.vae.decode(z, return_dict=False)[0].clone()
            shape = (spec["batch"], pipe.vae.config.latent_channels) + tuple(z.shape[-2:])
        calls = {"compiled": 0}
        cf = CompiledForward(module, {shape: fn})

        def counting(*a, **k):
            calls["compiled"] += tuple(a[0].shape) in cf.fns
            return cf(*a, **k)

        module.forward = counting  # instance attribute: nn.Module.__call__ -> _call_impl -> self.forward
        try:
            if part == "unet":
                got = _pipe_call(pipe, spec, steps=2)
            else:
                with _ctx(part):
                    got = pipe.vae.decode(z, return_dict=False)[0]
        finally:
            del module.forward
        u = pipe.unet
        out["patch_forward"] = {
            "works": True, "compiled_calls": calls["compiled"], "max_abs_diff_vs_eager_pipeline": _maxdiff(got, ref),
            "attributes_kept": {"config.sample_size": u.config.sample_size, "dtype": str(u.dtype),
                                "device": str(u.device), "has_add_embedding": hasattr(u, "add_embedding")}}
    except Exception as e:  # noqa: BLE001
        out["patch_forward"] = {"works": False, "error": _err(e)}
    return out


def _manual_cuda_graph(call, eager, spec) -> dict:
    """Capture the loaded function's call in our own torch.cuda.CUDAGraph (static inputs), as the engine would
    have to for a default-mode artifact or an AOTInductor package."""
    import torch

    try:
        with _ctx(spec["part"]):
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    call()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static_out = _first(call())
            g.replay()
            torch.cuda.synchronize()
            return {"works": True, "max_abs_diff_vs_eager": _maxdiff(static_out, eager),
                    "replay": _timed(g.replay, spec["device"], spec["iters"])}
    except Exception as e:  # noqa: BLE001
        return {"works": False, "error": _err(e)}


def stage_repro(spec: dict) -> dict:
    """Cheap (backend aot_eager: no Inductor) reproductions of what fails with the obvious calls."""
    import torch

    _setup(spec)
    pipe = _build(spec)
    module, args, kwargs = _capture(pipe, spec, "unet")
    stats: dict = {}
    filt = _guard_filter(stats)
    out = {}

    def attempt(name, f):
        t = time.perf_counter()
        try:
            with torch.no_grad():
                r = f()
            out[name] = {"ok": True, "result": r}
        except Exception as e:  # noqa: BLE001
            out[name] = {"ok": False, "error": _err(e)}
        out[name]["s"] = round(time.perf_counter() - t, 2)

    path = os.path.join(spec["workdir"], "repro.bin")
    attempt("bound_unet_forward_default_guard_filter", lambda: torch.compile(
        module.forward, fullgraph=True, backend="aot_eager").aot_compile((args, kwargs)) and "compiled")

    def decorated_save():
        f = torch.compile(module.forward, fullgraph=True, backend="aot_eager",
                          options={"guard_filter_fn": filt}).aot_compile((args, kwargs))
        f.save_compiled_function(path)
        return "saved"

    attempt("bound_unet_forward_filtered_guards_save", decorated_save)

    def decorated_external_data():
        inner = inspect.unwrap(type(module).forward)
        f = torch.compile(module.forward, fullgraph=True, backend="aot_eager",
                          options={"guard_filter_fn": filt}).aot_compile((args, kwargs))
        f.save_compiled_function(path, external_data={"forward_fn": inner})
        with open(path, "rb") as fh:
            g = torch.compiler.load_compiled_function(fh, external_data={"forward_fn": inner})
        return f"loaded; max abs diff {_maxdiff(_first(g(module, *args, **kwargs)), _first(module(*args, **kwargs)))}"

    attempt("bound_unet_forward_external_data_save_load", decorated_external_data)
    def inference_mode_roundtrip():
        # A small conv net compiled under torch.inference_mode(), saved, loaded and called under inference_mode
        # again (as core/gpu_stage.decode_latents would call a compiled VAE decoder).
        net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU()).to(spec["device"])
        x = torch.randn(1, 4, 16, 16, device=spec["device"])
        fwd = inspect.unwrap(type(net).forward)
        with torch.inference_mode():
            f = torch.compile(fwd, fullgraph=True, backend="aot_eager",
                              options={"guard_filter_fn": _guard_filter({})}).aot_compile(((net, x), {}))
            f(net, x)  # the in-process function passes its guards
        f.save_compiled_function(path)
        with open(path, "rb") as fh:
            g = _load_fn_from(fh)
        with torch.inference_mode():
            g(net, x)
        return "loaded function accepted under inference_mode"

    attempt("inference_mode_compile_save_load_call", inference_mode_roundtrip)
    attempt("mode_plus_options", lambda: torch.compile(
        module.forward, mode="reduce-overhead", fullgraph=True, options={"guard_filter_fn": filt}) and "accepted")
    attempt("optimized_module_has_aot_compile", lambda: hasattr(torch.compile(module, fullgraph=True), "aot_compile"))
    return out


def stage_aoti_compile(spec: dict) -> dict:
    import torch

    _setup(spec)
    res: dict = {}
    pipe = _build(spec)
    module, args, kwargs = _capture(pipe, spec, spec["part"])
    res["call"] = {"args": _describe(args), "kwargs": _describe(kwargs)}
    t = time.perf_counter()
    with _ctx(spec["part"]):
        ep = torch.export.export(module, args, kwargs)
    res["export_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    with _ctx(spec["part"]):
        torch._inductor.aoti_compile_and_package(ep, package_path=spec["artifact"])
    res["aoti_compile_and_package_s"] = round(time.perf_counter() - t, 3)
    res["artifact_bytes"] = os.path.getsize(spec["artifact"])
    with _ctx(spec["part"]):
        ref = _first(module(*args, **kwargs)).clone()
    torch.save({"args": args, "kwargs": kwargs, "ref": ref.cpu()}, spec["inputs"])
    return res


def stage_aoti_load(spec: dict) -> dict:
    import torch

    _setup(spec)
    dev = spec["device"]
    res: dict = {}
    pipe = _build(spec)
    module = pipe.unet if spec["part"] == "unet" else pipe.vae.decoder
    data = torch.load(spec["inputs"], map_location=dev, weights_only=False)
    args, kwargs = tuple(data["args"]), data["kwargs"]
    t = time.perf_counter()
    runner = torch._inductor.aoti_load_package(spec["artifact"])
    res["load_s"] = round(time.perf_counter() - t, 3)
    with _ctx(spec["part"]):
        eager = _first(module(*args, **kwargs)).clone()
        _sync(dev)
        t = time.perf_counter()
        out = _first(runner(*args, **kwargs)).clone()
        _sync(dev)
        res["first_call_s"] = round(time.perf_counter() - t, 4)
        res["max_abs_diff_vs_eager"] = _maxdiff(out, eager)
        res["steady_call"] = _timed(lambda: runner(*args, **kwargs), dev, spec["iters"])
        res["eager_call"] = _timed(lambda: module(*args, **kwargs), dev, spec["iters"])
    if spec.get("quick"):
        return res
    try:  # weights are constants of the package; swapping them needs load_constants
        fqns = runner.get_constant_fqns()
        res["constants"] = len(fqns)
        m2 = copy.deepcopy(module)
        with torch.no_grad():
            for p in m2.parameters():
                p.mul_(1.05)
            sd = {**dict(m2.named_parameters()), **dict(m2.named_buffers())}
            with _ctx(spec["part"]):
                e2 = _first(m2(*args, **kwargs)).clone()
                before = _first(runner(*args, **kwargs)).clone()
            runner.load_constants({k: sd[k] for k in fqns if k in sd}, check_full_update=False, user_managed=True)
            with _ctx(spec["part"]):
                after = _first(runner(*args, **kwargs)).clone()
        res["weights"] = {"baked_in": _maxdiff(before, eager) < 0.1 * max(_maxdiff(e2, eager), 1e-12),
                          "constants_matched_by_name": sum(k in sd for k in fqns),
                          "changed_weights_eager_vs_original_eager": _maxdiff(e2, eager),
                          "after_load_constants_max_abs_diff_vs_changed_eager": _maxdiff(after, e2)}
    except Exception as e:  # noqa: BLE001
        res["weights"] = {"error": _err(e)}
    if dev.startswith("cuda"):  # run_single_threaded: "useful to avoid conflicts with CUDAGraphs" (its docstring)
        try:
            single = torch._inductor.aoti_load_package(spec["artifact"], run_single_threaded=True)
            res["manual_cuda_graph"] = _manual_cuda_graph(lambda: single(*args, **kwargs), eager, spec)
        except Exception as e:  # noqa: BLE001
            res["manual_cuda_graph"] = {"works": False, "error": _err(e)}
    return res


STAGES = {"compile": stage_compile, "load": stage_load, "repro": stage_repro, "aoti_compile": stage_aoti_compile,
          "aoti_load": stage_aoti_load}


def child_main(stage: str, spec_path: str) -> int:
    with open(spec_path) as fh:
        spec = json.load(fh)
    t0 = time.perf_counter()
    try:
        res = {"ok": True, **STAGES[stage](spec)}
    except BaseException as e:  # noqa: BLE001 - the report wants every failure in full
        res = {"ok": False, "error": _err(e)}
    res["stage_wall_s"] = round(time.perf_counter() - t0, 3)
    with open(spec["result"], "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    return 0


# --------------------------------------------------------------------------------------------- orchestrator

def _env(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": device}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except Exception:  # noqa: BLE001
        pass
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    env["cxx"] = cxx or "MISSING: Inductor's CPU backend needs a C++ compiler (apt-get install g++)"
    if cxx:
        try:
            env["cxx_version"] = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                                timeout=10).stdout.splitlines()[0]
        except Exception:  # noqa: BLE001
            pass
    env["aot_compile_api"] = {
        "dynamo_config_enable_aot_compile": getattr(torch._dynamo.config, "enable_aot_compile", None),
        "torch.compiler.load_compiled_function": hasattr(torch.compiler, "load_compiled_function"),
        "torch._inductor.aoti_load_package": hasattr(torch._inductor, "aoti_load_package")}
    return env


class Probe:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.workdir = args.workdir or tempfile.mkdtemp(prefix="aot-probe-")
        os.makedirs(self.workdir, exist_ok=True)
        self.report: dict = {"probe": "aot_compile / load_compiled_function (and AOTInductor)",
                             "command": " ".join([os.path.basename(sys.executable), "-m", "experiments.aot_probe"]
                                                 + sys.argv[1:]),
                             "workdir": self.workdir, "runs": [], "aoti": [], "skipped": []}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def write(self) -> None:
        self.report["wall_s"] = round(time.perf_counter() - self.t0, 2)
        self.report["answers"] = answers(self.report)
        if self.args.out:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
            tmp = self.args.out + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(self.report, fh, indent=1, default=str)
            os.replace(tmp, self.args.out)

    def stage(self, stage: str, spec: dict, cache: str, min_left: float = 20.0) -> dict | None:
        name = f"{stage} {spec.get('model')}/{spec.get('part')}/{spec.get('mode', '')}".rstrip("/")
        if self.left() < min_left:
            self.report["skipped"].append(f"{name}: budget ({self.args.budget_s:.0f} s) spent")
            print(f"[aot-probe] skip {name}: budget spent", flush=True)
            return None
        tag = name.replace(" ", "-").replace("/", "-") + ("-again" if spec.get("quick") else "")
        spec = {**spec, "result": os.path.join(self.workdir, f"{tag}.result.json"), "workdir": self.workdir}
        spec_path = os.path.join(self.workdir, f"{tag}.spec.json")
        with open(spec_path, "w") as fh:
            json.dump(spec, fh)
        env = dict(os.environ)
        os.makedirs(cache, exist_ok=True)
        env.update(TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"),
                   TORCHINDUCTOR_FX_GRAPH_CACHE="1", TORCHINDUCTOR_AUTOGRAD_CACHE="1",
                   PYTHONPATH=HERE + os.pathsep + env.get("PYTHONPATH", ""))
        print(f"[aot-probe] {name} (cache {os.path.basename(cache)}, {self.left():.0f} s left)", flush=True)
        t = time.perf_counter()
        log = os.path.join(self.workdir, f"{tag}.log")
        try:
            with open(log, "w") as lf:
                p = subprocess.run([sys.executable, "-m", "experiments.aot_probe", "--_stage", stage, "--_spec",
                                    spec_path], cwd=HERE, env=env, stdout=lf, stderr=subprocess.STDOUT,
                                   timeout=max(self.left(), 30))
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        wall = round(time.perf_counter() - t, 2)
        if os.path.exists(spec["result"]):
            with open(spec["result"]) as fh:
                res = json.load(fh)
        else:
            with open(log, errors="replace") as fh:
                tail = fh.read()[-6000:]
            res = {"ok": False, "error": {"type": "ChildDied", "message": f"rc={rc}", "log_tail": tail}}
        res["process_wall_s"] = wall  # includes interpreter start, imports, building the pipeline
        summary = {k: res.get(k) for k in ("aot_compile_s", "aoti_compile_and_package_s", "load_s",
                                           "first_call_s", "artifact_bytes") if res.get(k) is not None}
        print(f"[aot-probe]   -> ok={res.get('ok')} {summary} "
              f"{'' if res.get('ok') else res['error'].get('type', '') + ': ' + res['error'].get('message', '')[:300]}"
              f" ({wall} s)", flush=True)
        return res

    def compile_then_load(self, run: dict, spec: dict, tag: str, compile_stage: str, load_stage: str,
                          compile_needs: float, load_needs: float) -> None:
        """Compile in one process; if that worked, load the artifact in a fresh process with an empty cache,
        then again with the cache that load left behind. Each result goes into `run` and the report on disk."""
        run["compile"] = self.stage(compile_stage, spec, os.path.join(self.workdir, f"cache-compile-{tag}"),
                                    compile_needs)
        self.write()
        if not (run["compile"] and run["compile"].get("ok")):
            return
        load_cache = os.path.join(self.workdir, f"cache-load-{tag}")
        run["load_fresh_cache"] = self.stage(load_stage, spec, load_cache, load_needs)
        self.write()
        run["load_same_cache_again"] = self.stage(load_stage, {**spec, "quick": True}, load_cache, load_needs)
        self.write()

    def run(self) -> dict:
        a = self.args
        self.report["env"] = _env(a.device)
        self.report["settings"] = {"models": a.models, "parts": a.parts, "modes": a.modes, "dtype": a.dtype,
                                   "batch_images": a.batch, "engine_opts": not a.plain, "aoti": a.aoti,
                                   "budget_s": a.budget_s}
        self.write()
        base = {"device": a.device, "dtype": a.dtype, "batch": a.batch, "engine_opts": not a.plain,
                "iters": a.iters}

        def need(model, what):  # seconds a step needs to be worth starting (a killed compile measures nothing)
            return {"compile": 40, "load": 15}[what] * (1 if model in TINY else 5)

        if a.repro is None:  # three Dynamo traces of the UNet: seconds for a tiny model, a minute for SDXL
            a.repro = bool(a.models) and a.models[0] in TINY
        if a.repro and a.models:
            m = a.models[0]
            self.report["repro"] = self.stage("repro", {**base, "model": m, "part": "unet"},
                                              os.path.join(self.workdir, "cache-repro"))
            self.write()
        for model in a.models:
            for mode in a.modes:
                for part in a.parts:
                    tag = f"{model}-{part}-{mode}"
                    spec = {**base, "model": model, "part": part, "mode": mode,
                            "artifact": os.path.join(self.workdir, f"{tag}.aot"),
                            "inputs": os.path.join(self.workdir, f"{tag}.inputs.pt")}
                    run = {"model": model, "part": part, "mode": mode, "method": "aot_compile"}
                    self.report["runs"].append(run)
                    self.compile_then_load(run, spec, tag, "compile", "load", need(model, "compile"),
                                           need(model, "load"))
            for part in a.parts:
                failed = any(r["model"] == model and r["part"] == part and r.get("compile") is not None
                             and not _run_ok(r) for r in self.report["runs"])  # (None: skipped, not failed)
                if a.aoti == "on" or (a.aoti == "auto" and failed):
                    tag = f"{model}-{part}-aoti"
                    spec = {**base, "model": model, "part": part, "mode": "aoti",
                            "artifact": os.path.join(self.workdir, f"{tag}.pt2"),
                            "inputs": os.path.join(self.workdir, f"{tag}.inputs.pt")}
                    run = {"model": model, "part": part, "method": "aoti"}
                    self.report["aoti"].append(run)
                    self.compile_then_load(run, spec, tag, "aoti_compile", "aoti_load", need(model, "compile"),
                                           need(model, "load"))
        self.write()
        if not a.keep:
            for f in os.listdir(self.workdir):  # artifacts and caches (GBs for SDXL); logs stay
                p = os.path.join(self.workdir, f)
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                elif not f.endswith((".log", ".json")):
                    os.remove(p)
        return self.report


def _run_ok(r: dict) -> bool:
    return all((r.get(k) or {}).get("ok") for k in ("compile", "load_fresh_cache"))


def answers(report: dict) -> dict:
    """The questions of the probe, answered from what this run measured (None: not measured in this run)."""
    ans: dict = {}
    runs = report.get("runs", [])
    ans["aot_compile_works"] = {f"{r['model']}/{r['part']}/{r['mode']}": _run_ok(r) if r.get("compile") else None
                                for r in runs}
    loads = [(r, r.get("load_fresh_cache") or {}) for r in runs]
    w = [ld.get("other_instance_changed_weights", {}).get("weights_from_call_module") for _, ld in loads]
    w = [x for x in w if x is not None]
    ans["weights_baked_in"] = None if not w else (
        "no: the loaded function takes the module as its first argument and reads its parameters/buffers at "
        "every call (a copy with changed weights gives that copy's eager output)" if all(w) else
        "yes/partly: output did not follow the passed module's weights (see runs)")
    ans["inputs_of_loaded_function"] = (
        "fn(module, *args, **kwargs): the compiled function is the module class's undecorated forward "
        "(inspect.unwrap), so it is called with the module instance first, then exactly the pipeline's "
        "arguments; the guards check the module's structure/attributes/tensor metadata (not its identity), "
        "the inputs' shapes/dtypes/strides, the constant kwargs and the grad mode")
    other = [ld.get("other_instance_changed_weights", {}).get("guards_pass") for _, ld in loads]
    ans["other_instance_passes_guards"] = None if not any(o is not None for o in other) else all(
        o for o in other if o is not None)
    ans["guard_refusals"] = {f"{r['model']}/{r['part']}/{r['mode']}": {k: v.get("passes", v.get("error"))
                             for k, v in (ld.get("guard_refusals") or {}).items()} for r, ld in loads if ld}
    ans["pipeline_plug_in"] = {f"{r['model']}/{r['part']}/{r['mode']}": (ld.get("pipeline") or {}).get(
        "patch_forward", {}).get("works") for r, ld in loads if ld}
    cg = {}
    for r, ld in loads:
        if r["mode"] != "default" and ld.get("cudagraphs"):
            cg[f"{r['model']}/{r['part']}/{r['mode']}"] = {"loaded_with_cudagraphs": ld.get("cudagraphs"),
                                                           "opposite": ld.get("load_opposite_cudagraphs")}
    ans["reduce_overhead"] = cg or (
        "not measurable here (no CUDA). From torch's source: aot_compile takes the mode's Inductor options "
        "(mode= and options= are exclusive, so pass options={'triton.cudagraphs': True, 'guard_filter_fn': ...}); "
        "the artifact stores cudagraph info only when compiled with cudagraphs, and load_compiled_function "
        "wraps it in CUDA graph trees only if torch._inductor.config.triton.cudagraphs is True while loading")
    starts = {}
    for r in runs:
        for key in ("load_fresh_cache", "load_same_cache_again"):
            ld = r.get(key) or {}
            if ld.get("ok"):
                starts.setdefault(f"{r['model']}/{r['part']}/{r['mode']}", {})[key] = {
                    "load_s": ld.get("load_s"), "first_call_s": ld.get("first_call_s"),
                    "split": ld.get("load_split"), "steady_call_s": (ld.get("steady_call") or {}).get("median_s"),
                    "eager_call_s": (ld.get("eager_call") or {}).get("median_s")}
    ans["start_cost"] = starts
    manual = {f"{r.get('model')}/{r.get('part')}/{r.get('mode', 'aoti')}": {
        "works": ld["manual_cuda_graph"].get("works"),
        "replay_s": (ld["manual_cuda_graph"].get("replay") or {}).get("median_s"),
        "steady_call_s": (ld.get("steady_call") or {}).get("median_s")}
        for r in runs + report.get("aoti", []) for ld in [r.get("load_fresh_cache") or {}]
        if ld.get("manual_cuda_graph")}
    if manual:
        ans["manual_cuda_graph"] = manual
    ans["vae_grad_mode"] = (
        "compile and call the VAE decoder under torch.no_grad(): a function aot-compiled under "
        "torch.inference_mode() passes its guards in the compiling process but, once saved and loaded, fails them "
        "under inference_mode (tensor dispatch key set mismatch, see repro_errors), and one compiled under no_grad "
        "refuses inference tensors")
    ans["repro_errors"] = {k: (v.get("error") or {}).get("message", v.get("result")) if isinstance(v, dict) else v
                           for k, v in (report.get("repro") or {}).items() if k not in ("ok", "stage_wall_s",
                                                                                          "process_wall_s")}
    return ans


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="comma list of tiny-sd, tiny-sdxl, sd15, sdxl "
                    "(default tiny-sd,tiny-sdxl)")
    ap.add_argument("--parts", default="unet,vae", help="unet, vae (the VAE decoder)")
    ap.add_argument("--modes", default=None, help="compile modes (default: CUDA reduce-overhead,default; CPU default)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="float16 | float32 (default: CUDA float16, CPU float32)")
    ap.add_argument("--batch", type=int, default=1, help="images per call (the UNet sees 2x: CFG)")
    ap.add_argument("--plain", action="store_true", help="no engine settings (fused QKV, channels_last)")
    ap.add_argument("--aoti", choices=("auto", "on", "off"), default="auto",
                    help="AOTInductor: auto = only where aot_compile failed")
    ap.add_argument("--repro", dest="repro", action="store_true", default=None,
                    help="reproduce the errors met on the way (default: when the first model is a tiny one)")
    ap.add_argument("--no-repro", dest="repro", action="store_false")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per measurement")
    ap.add_argument("--budget-s", type=float, default=540.0, help="no new step starts after this")
    ap.add_argument("--workdir", default=None, help="artifacts, caches, logs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep artifacts and caches in the workdir")
    ap.add_argument("--out", default=None, help="JSON report path")
    ap.add_argument("--_stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_spec", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._stage:
        return child_main(a._stage, a._spec)
    import torch

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.dtype = a.dtype or ("float16" if a.device.startswith("cuda") else "float32")
    a.models = (a.model or "tiny-sd,tiny-sdxl").split(",")
    a.parts = a.parts.split(",")
    a.modes = (a.modes or ("reduce-overhead,default" if a.device.startswith("cuda") else "default")).split(",")
    a.iters = a.iters or (10 if a.device.startswith("cuda") else 5)
    report = Probe(a).run()
    print(json.dumps({"answers": report["answers"], "skipped": report["skipped"], "wall_s": report["wall_s"]},
                     indent=1, default=str))
    if a.out:
        print(f"[aot-probe] report: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
