"""What can share one UNet call, and which seed each image uses.

Every image is one sample with its own scheduler, generator, latents and guidance (core/denoise_state.py), so a
UNet call can mix steps, schedulers, guidance scales and seeds: one per-sample timestep tensor and a per-sample
guidance tensor carry the differences (core/unet_step.py). Only what changes the UNet's input shapes or weights
splits calls: the group key.
"""
from __future__ import annotations

from typing import Hashable

from core.schemas import MAX_SEED, GenerationRequest


def group_key(req: GenerationRequest) -> Hashable:
    """(model, width, height) of a resolved request: requests with equal keys can share UNet calls. Later also
    the adapter set / ControlNet (they change the UNet's weights or inputs)."""
    return (req.model, req.width, req.height)


def image_seed(req: GenerationRequest, index: int) -> int:
    """Image i of a request uses seed + i (mod 2**32), as A1111 does."""
    return (req.seed + index) % (MAX_SEED + 1)
