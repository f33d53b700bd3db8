"""Step noise drawn ahead, so the stochastic schedulers' steps never make the host wait for the GPU.

diffusers' stochastic schedulers (euler_a, the SDE DPM-Solvers, DDPM, LCM, TCD, ...) draw each step's noise with
`randn_tensor(shape, generator=<the image's CPU generator>, device=<the latents' device>)`: a CPU draw and a
blocking host-to-device copy per step and image. Each one stops the host from queueing the next work while the GPU
runs the UNet (one mixed batch of 8 on an H100: 50 such waits from euler_a alone; experiments/sync_probe.py).

A CPU generator drawing k tensors of n values one after the other gives exactly the values of one draw of k*n
values when n is a multiple of 16 (torch's CPU normal_ fills 16 values at a time; tests/core/test_ahead_noise.py
checks every dtype the engine uses). So on its first step an image's remaining draws are made at once, copied from
pinned memory without a sync, and served one per step: the images stay bit-identical to per-step draws.

The seam: diffusers has no hook for a step's noise, and its scheduler modules call `randn_tensor` through their
own module namespace. `install()` replaces that name in the modules of the schedulers the engine serves
(core/schedulers.py) by `randn_tensor` below, which serves an AheadNoise and hands every other generator (a
pipeline of the user's own, the benchmarks' diffusers baseline) to diffusers' function unchanged.
"""
from __future__ import annotations

import importlib
import math
from typing import Any

# the diffusers modules of core/schedulers.py's schedulers whose step() draws noise
_MODULES = ("scheduling_euler_ancestral_discrete", "scheduling_euler_discrete", "scheduling_dpmsolver_multistep",
            "scheduling_dpmsolver_singlestep", "scheduling_k_dpm_2_ancestral_discrete", "scheduling_ddpm",
            "scheduling_ddim", "scheduling_lcm", "scheduling_tcd")
_original = None


class AheadNoise:
    """An image's step noise: its CPU generator's draws, made ahead on first use (see the module docstring)."""

    def __init__(self, generator, sample):
        self.generator, self.sample = generator, sample  # sample.remaining: the steps (draws at most) to come
        self._drawn = None
        self._next = 0

    @property
    def device(self):  # what diffusers reads of a generator
        return self.generator.device

    def draw(self, shape, device, dtype, layout):
        import torch

        shape = tuple(shape)
        buf = self._drawn
        if buf is not None and self._next < buf.shape[0] and buf.shape[1:] == shape and buf.dtype == dtype:
            self._next += 1
            return buf[self._next - 1]
        # no draw ahead: values would not match per-step draws (a size that is not a multiple of 16), or a
        # different shape after drawing ahead (no scheduler does that: its draws would just come after the others)
        if math.prod(shape) % 16 or (layout is not None and layout != torch.strided) or buf is not None:
            return _original(shape, generator=self.generator, device=device, dtype=dtype, layout=layout)
        from core.device_copy import to_device

        cpu = torch.randn((max(self.sample.remaining, 1), *shape), generator=self.generator, dtype=dtype)
        self._drawn = to_device(cpu, device if device is not None else "cpu")
        self._next = 1
        return self._drawn[0]


def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
    """diffusers.utils.torch_utils.randn_tensor, serving an AheadNoise's draws."""
    if isinstance(generator, AheadNoise):
        return generator.draw(shape, device, dtype, layout)
    if isinstance(generator, list) and len(generator) == 1 and isinstance(generator[0], AheadNoise):
        return generator[0].draw(shape, device, dtype, layout)
    return _original(shape, generator=generator, device=device, dtype=dtype, layout=layout)


def install() -> None:
    """Route the stochastic schedulers' noise through randn_tensor above (idempotent)."""
    global _original
    if _original is not None:
        return
    from diffusers.utils import torch_utils

    _original = torch_utils.randn_tensor
    for name in _MODULES:
        module = importlib.import_module(f"diffusers.schedulers.{name}")
        if getattr(module, "randn_tensor", None) is _original:
            module.randn_tensor = randn_tensor


def step_generator(generator, sample) -> Any:
    """What the engine passes as a scheduler step's `generator`."""
    install()
    return AheadNoise(generator, sample)
