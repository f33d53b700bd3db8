"""Schedulers by name (A1111-style names) -> a fresh diffusers scheduler per call.

Diffusers schedulers keep mutable state (timesteps, step index, solver history) and are not thread-safe,
so the engine builds a new one from the model's base scheduler config for every pipeline call.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

# name -> (diffusers class name, config overrides). All stochastic ones draw their noise through the
# pipeline's per-sample generators, so an image depends only on its own request's seed.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpmpp_sde_1s": ("DPMSolverSinglestepScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "kdpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}


class UnknownSchedulerError(ValueError):
    pass


def check_scheduler_name(name: str) -> str:
    key = name.strip().lower()
    if key not in SCHEDULERS:
        raise UnknownSchedulerError(f"unknown scheduler {name!r}; valid: {', '.join(sorted(SCHEDULERS))}")
    return key


@functools.lru_cache(maxsize=None)
def _takes_clip_sample(cls) -> bool:  # (once per class: make_scheduler runs for every image)
    return "clip_sample" in inspect.signature(cls.__init__).parameters


def make_scheduler(name: str, base_config: Any):
    """A new scheduler instance of `name`, built from the model's own scheduler config."""
    import diffusers

    cls_name, overrides = SCHEDULERS[check_scheduler_name(name)]
    if cls_name == "UniPCMultistepScheduler":  # the same math without waiting for the GPU (its module says how)
        from core.unipc_sync_free import SyncFreeUniPCMultistepScheduler as cls
    else:
        cls = getattr(diffusers, cls_name)
    # DDIM/DDPM default to clip_sample=True, which clamps the predicted x0 to [-1, 1]: wrong for latents. diffusers'
    # SD pipeline turns it off when a model's scheduler config does not set it; so does this (SDXL's configs set it)
    defaults = set(base_config.get("_use_default_values", ())) if hasattr(base_config, "get") else set()
    if _takes_clip_sample(cls) and (
            "clip_sample" not in base_config or "clip_sample" in defaults) and "clip_sample" not in overrides:
        overrides = {**overrides, "clip_sample": False}
    return cls.from_config(base_config, **overrides)
