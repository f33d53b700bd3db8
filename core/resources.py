"""Resources of one engine actor (a Serve model replica or a Ray Data engine actor) and the engine config it loads.

One rule for both (serving/builder.py and batch_jobs/runner.py call it): 'auto' GPUs means one whole GPU when the
cluster has GPUs and the engine may use one; the VRAM budget never exceeds the GPU share reserved; an actor that
reserved no GPU runs its 'auto' engine on CPU. No Ray import: callers pass what the cluster has.
"""
from __future__ import annotations

from typing import Literal

from core.config import EngineConfig

# Read, write and checkpoint-filter tasks of a Ray Data job need about this many CPUs beside the engine actors.
DATA_SIDE_CPUS = 2.0


def actor_num_gpus(requested: float | Literal["auto"] | None, cluster_has_gpus: bool, device: str = "auto") -> float:
    """GPUs an actor reserves (Ray num_gpus). 'auto' or None: 1 when the cluster has GPUs and the engine is not
    pinned to CPU, else 0. A number (0.5 puts two actors on a GPU) is taken as is."""
    if requested is None or requested == "auto":
        return 1.0 if cluster_has_gpus and device != "cpu" else 0.0
    return float(requested)


def actor_num_cpus(requested: float | None, cluster_cpus: float, actors: int,
                   side_cpus: float = DATA_SIDE_CPUS) -> float:
    """CPUs an actor reserves. None: 1, less when the cluster is too small to also run `side_cpus` of other work
    beside `actors` actors (reserving a whole CPU each would starve it); a number is taken as is."""
    if requested is not None:
        return float(requested)
    spare = (cluster_cpus - side_cpus) / max(1, actors)
    return 1.0 if spare >= 1 else max(0.0, round(spare, 2))


def engine_for_actor(engine: EngineConfig, num_gpus: float) -> EngineConfig:
    """The engine config an actor holding `num_gpus` loads: its VRAM budget fraction capped at the GPU share it
    reserved (memory.gpu_fraction <= min(1, num_gpus)); with no GPU reserved, device 'auto' becomes 'cpu' so the
    engine never touches a GPU that Ray gave another actor. Returns a copy; `engine` is unchanged."""
    engine = engine.model_copy(deep=True)
    if num_gpus > 0:
        share = min(1.0, num_gpus, engine.memory.gpu_fraction)
        engine.memory = engine.memory.model_copy(update={"gpu_fraction": share})
    elif engine.device == "auto":
        engine.device = "cpu"
    return engine
