"""Persisted torch.compile artifacts (Inductor/AOTAutograd "mega-cache"), shared by replicas via cache_dir.

A replica that finds artifacts for its exact key (model, dtype, GPU, torch, settings, warm-up shapes) loads them
before compiling, so its warm-up hits the caches instead of running Inductor again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

log = logging.getLogger(__name__)


def cache_path(engine) -> str:
    import torch

    gpu = torch.cuda.get_device_name(torch.device(engine.device)) if engine.device.startswith("cuda") else "cpu"
    cfg = engine.config
    key = json.dumps({"source": cfg.source, "family": engine.family, "dtype": str(engine.dtype), "gpu": gpu,
                      "torch": torch.__version__, "opt": cfg.optimization.model_dump(mode="json"),
                      "shapes": engine.warmup_shapes(), "max_batch": cfg.limits.max_batch_size,
                      "level": engine.level.value}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return os.path.join(cfg.cache_dir, "compile", f"{cfg.name.replace('/', '_')}-{digest}.bin")


def cache_key(engine) -> str:
    """The key of everything compiled for this engine (model, dtype, GPU, torch, settings, shapes)."""
    return os.path.basename(cache_path(engine)).removesuffix(".bin")


def load(engine) -> bool:
    import torch

    path = cache_path(engine)
    if not os.path.exists(path):
        return False
    with open(path, "rb") as fh:
        torch.compiler.load_cache_artifacts(fh.read())
    log.info("compile cache: loaded %s", path)
    return True


def save(engine) -> str | None:
    import torch

    artifacts = torch.compiler.save_cache_artifacts()
    if not artifacts:
        return None
    path = cache_path(engine)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as fh:
        fh.write(artifacts[0])
    os.replace(tmp, path)  # atomic: concurrent replicas never read a half-written file
    log.info("compile cache: saved %s (%d bytes)", path, len(artifacts[0]))
    return path


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
