"""torch.compile's portable cache artifacts in a store shared by replicas (optimization.compile_artifacts).

`torch.compiler.save_cache_artifacts()` bundles what this process compiled or found in its caches (Inductor FX
graphs with their Triton kernels, AOTAutograd entries, autotuning results, PGO decisions) into one blob;
`load_cache_artifacts(blob)` writes them into another process's local caches, so that process's warm-up finds every
graph there: Dynamo still traces, Inductor and Triton compile nothing. This replaces the removed `aot` path
(aot_compile functions per shape, which failed on torch 2.11 CUDA pickling Dynamo's RootGuardManager).

The blob lives in a store (an fsspec URI: s3://, gs://, file:// on NFS, or a local folder; default
cache_dir/compile) under a key naming everything that changes the compiled code: GPU, torch, CUDA, Triton and
Python versions, model identity (source, revision, family, dtype), the optimization settings and the warm-up
shapes and buckets. Flow (Engine._load): before warm-up `load` looks the key up (hit: artifacts loaded); after it
`after_warmup` uploads on a miss (or when a hit still compiled some graphs). A store that is unreachable, slow past
timeout_s or holds unusable bytes only costs a warning and a normal compile: never a failed replica.
With `compile: aoti` the blob is instead a zip of the UNet's AOTInductor packages (core/aoti_unet.py), also kept
unpacked in cache_dir/aoti/KEY/ (a restart on the same node opens them without reading the store).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

SUFFIX = ".bin"  # the blob; beside it KEY.json holds the key's fields (what a human compares when keys differ)
# Optimization fields that never change the compiled graphs (kept out of the key: changing them must not miss)
NOT_IN_KEY = ("warmup_steps", "compile_artifacts")


def key_fields(engine) -> dict:
    """Everything the compiled code depends on, as JSON-able values."""
    import torch

    from core.fastpath import image_buckets, row_buckets

    cfg = engine.config
    cuda = engine.device.startswith("cuda")
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - CPU builds have no Triton: not part of their compiled code
        triton_version = None
    opt = cfg.optimization.model_dump(mode="json", exclude=set(NOT_IN_KEY))
    return {"gpu": torch.cuda.get_device_name(torch.device(engine.device)) if cuda else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None, "triton": triton_version,
            "python": "%d.%d" % sys.version_info[:2],
            "model": {"source": cfg.source, "revision": cfg.revision, "family": engine.family,
                      "dtype": str(engine.dtype).replace("torch.", "")},
            "optimization": hashlib.sha256(json.dumps(opt, sort_keys=True).encode()).hexdigest()[:16],
            "memory_level": engine.level.value, "shapes": [list(s) for s in engine.warmup_shapes()],
            "row_buckets": row_buckets(engine), "image_buckets": image_buckets(engine)}


def cache_key(engine, fields: dict | None = None) -> str:
    """`<model name>-<hash of key_fields>`: one blob per model, GPU, software stack, settings and shapes."""
    fields = fields or key_fields(engine)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    return f"{engine.config.name.replace('/', '_').replace(':', '_')}-{digest}"


def store_uri(config) -> str:
    return config.optimization.compile_artifacts.store or os.path.join(config.cache_dir, "compile")


class ArtifactStore:
    """KEY.bin and KEY.json under one fsspec URI. Writes go to a temporary name, then move onto the final one:
    a reader never sees half a blob (rename on local/NFS; object stores publish a put whole); concurrent writers
    of one key each publish a complete blob and the last one wins."""

    def __init__(self, uri: str):
        from fsspec.core import url_to_fs

        self.uri = uri
        self.fs, self.root = url_to_fs(uri)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def get(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(key + SUFFIX))
        except FileNotFoundError:
            return None

    def put(self, key: str, blob: bytes, fields: dict) -> str:
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except Exception:  # noqa: BLE001 - object stores have no folders (or no right to create the bucket)
            pass
        for name, data in ((key + ".json", json.dumps(fields, indent=1, sort_keys=True).encode()),
                           (key + SUFFIX, blob)):  # the blob last: its presence means a complete pair
            final = self.path(name)
            tmp = f"{final}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)
        return self.path(key + SUFFIX)


def _bounded(fn, timeout_s: float):
    """fn() in a worker thread, waiting at most timeout_s (a hung store must not hold the replica's start)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile-store")
    try:
        return pool.submit(fn).result(timeout=timeout_s)
    finally:
        pool.shutdown(wait=False)


def load(engine) -> dict:
    """Before warm-up: the key's artifacts into this process's compile caches (aoti: its packages opened).
    Returns what happened (key, store, hit, bytes; error where the store failed): a failure is a warning and a
    miss."""
    settings = engine.config.optimization.compile_artifacts
    fields = key_fields(engine)
    out = {"key": cache_key(engine, fields), "store": store_uri(engine.config), "hit": False}
    engine._compile_key = (out["key"], fields)
    engine._misses_before = counters().get("fxgraph_cache_miss", 0)
    aoti = getattr(engine, "aoti", None)
    if aoti is not None:
        aoti.folder = os.path.join(engine.config.cache_dir, "aoti", out["key"])
        if aoti.open_folder():  # a restart on the node that built them: no store read
            out.update(hit=True, local=True, packages=len(aoti.models))
            return out
    if not settings.read:
        return out
    import torch

    try:
        blob = _bounded(lambda: ArtifactStore(out["store"]).get(out["key"]), settings.timeout_s)
        if blob is None:
            log.info("compile artifacts: %s not in %s; warm-up compiles", out["key"], out["store"])
            return out
        if aoti is not None:
            out["packages"] = aoti.unpack(blob)
        elif torch.compiler.load_cache_artifacts(blob) is None:  # torch warns why (un-pickling failed)
            raise ValueError("torch could not read them (written by another torch?)")
    except Exception as err:  # noqa: BLE001 - any store or format problem: compile normally
        out["error"] = f"{type(err).__name__}: {err}"
        log.warning("compile artifacts %s from %s unusable (%s); compiling normally", out["key"], out["store"],
                    out["error"])
        return out
    out.update(hit=True, bytes=len(blob))
    log.info("compile artifacts: loaded %s from %s (%d bytes)", out["key"], out["store"], len(blob))
    return out


def save(engine, force: bool = False) -> dict | None:
    """Upload this process's artifacts under the engine's key (write on, or force for `sdserve precompile`).
    Returns {key, path, bytes}, or None when nothing was written (a failure is a warning)."""
    settings = engine.config.optimization.compile_artifacts
    if not (settings.write or force):
        return None
    import torch

    key, fields = getattr(engine, "_compile_key", None) or (cache_key(engine), key_fields(engine))
    aoti = getattr(engine, "aoti", None)
    if aoti is not None:
        if not aoti.models:
            return None
        blob = aoti.pack()
    else:
        artifacts = torch.compiler.save_cache_artifacts()
        if not artifacts:
            return None
        blob = artifacts[0]
    uri = store_uri(engine.config)
    try:
        path = _bounded(lambda: ArtifactStore(uri).put(key, blob, fields), settings.timeout_s)
    except Exception as err:  # noqa: BLE001 - the replica serves anyway; the next one compiles too
        log.warning("compile artifacts %s not written to %s (%s: %s)", key, uri, type(err).__name__, err)
        return None
    log.info("compile artifacts: saved %s (%d bytes)", path, len(blob))
    return {"key": key, "path": path, "bytes": len(blob)}


def after_warmup(engine) -> dict:
    """After warm-up: the compile counters, and an upload when the warm-up compiled anything (a miss, or a hit
    whose blob lacked some graphs: the new blob holds every graph this process used)."""
    result = {"compile_counters": counters()}
    aoti = getattr(engine, "aoti", None)
    if aoti is not None:
        result["aoti"] = aoti.report()
    if compiled_now(engine) or not engine.applied.get("compile_cache_hit"):
        saved = save(engine)
        if saved:
            result["compile_artifacts_saved"] = saved
    return result


def compiled_now(engine) -> bool:
    """Whether this process compiled anything since `load` (Inductor FX graph misses; aoti: packages built)."""
    aoti = getattr(engine, "aoti", None)
    if aoti is not None:
        return aoti.built > 0
    return counters().get("fxgraph_cache_miss", 0) > getattr(engine, "_misses_before", 0)


def counters() -> dict:
    """Compile-cache hits and misses so far in this process (Inductor FX graphs, AOTAutograd): shows whether
    a warm start really skipped compiling."""
    try:
        from torch._dynamo.utils import counters as c
    except Exception:  # noqa: BLE001 - private API; absence only loses a diagnostic
        return {}
    keys = {"inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
            "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass")}
    out = {k: c[group][k] for group, names in keys.items() for k in names if c[group].get(k)}
    frames = c["stats"].get("unique_graphs")
    if frames:
        out["unique_graphs"] = frames
    return out
