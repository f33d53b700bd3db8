"""`sdserve precompile CONFIG`: build each compiled engine of a config on this machine, warm up every bucket and
write its compile artifacts to the configured store (core/compile_cache.py), so replicas on fresh nodes of the same
GPU and software start from them instead of compiling."""
from __future__ import annotations

import time

from core.config import EngineConfig


def precompile(config: EngineConfig, force: bool = False) -> dict:
    """One engine: load + warm-up (compiling what the store lacks), then write the artifacts. force: ignore what
    the store holds (compile and overwrite). Returns {model, key, store, hit, bytes, path, seconds} or {model,
    skipped: why}."""
    from core import compile_cache
    from core.engine import Engine

    opt = config.optimization
    if opt.compile == "none":
        return {"model": config.name, "skipped": "optimization.compile is 'none': nothing is compiled"}
    artifacts = opt.compile_artifacts.model_copy(update={"read": not force, "write": False})
    config = config.model_copy(update={"optimization": opt.model_copy(update={"compile_artifacts": artifacts})})
    t0 = time.perf_counter()
    engine = Engine(config).load()
    if not engine.compiled:
        return {"model": config.name, "skipped": f"not compiled at memory level {engine.level.value} "
                "(torch.compile needs a fully resident model)"}
    loaded = engine.applied.get("compile_artifacts") or {}
    out = {"model": config.name, "key": loaded.get("key"), "store": loaded.get("store"),
           "hit": bool(loaded.get("hit")), "seconds": round(time.perf_counter() - t0, 1),
           "counters": engine.applied.get("compile_counters")}
    compiled = compile_cache.compiled_now(engine)
    # a local hit (aoti packages already on this node) says nothing about the store: write them there
    if out["hit"] and not compiled and not loaded.get("local"):
        out["bytes"] = loaded.get("bytes")
        out["path"] = None  # already complete in the store: nothing written
        return out
    saved = compile_cache.save(engine, force=True)
    if saved is None:
        raise RuntimeError(f"{config.name}: compile artifacts could not be written to {out['store']} "
                           "(see the warning above)")
    out.update(bytes=saved["bytes"], path=saved["path"])
    return out
