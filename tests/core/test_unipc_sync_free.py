"""The engine's UniPC (core/unipc_sync_free.py): coefficients on the CPU, the same trajectory as diffusers' UniPC."""
from __future__ import annotations

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from core import unipc_sync_free
from core.unipc_sync_free import SyncFreeUniPCMultistepScheduler

BASE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def trajectory(cls, steps: int, seed: int = 0, **config) -> list[torch.Tensor]:
    sched = cls(**BASE, **config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    out = []
    for t in sched.timesteps:
        model_output = torch.randn(2, 4, 8, 8, generator=g) * 0.5 + 0.1 * x  # depends on x, as a UNet does
        x = sched.step(model_output, t, x, return_dict=False)[0]
        out.append(x)
    return out


@pytest.mark.parametrize("config", [{}, {"solver_order": 3}, {"solver_type": "bh1"}, {"predict_x0": False},
                                    {"use_karras_sigmas": True}, {"solver_order": 3, "use_karras_sigmas": True}])
@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_same_trajectory_as_diffusers(monkeypatch, config, steps):
    reference = trajectory(UniPCMultistepScheduler, steps, **config)
    calls = []
    monkeypatch.setattr(unipc_sync_free, "sync_free", lambda device: calls.append(device) or True)  # the GPU path
    mine = trajectory(SyncFreeUniPCMultistepScheduler, steps, **config)
    assert calls  # the CPU-coefficient path ran
    for a, b in zip(reference, mine, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, equal_nan=True)  # (diffusers: NaN for some configs)


def test_cpu_latents_take_diffusers_own_path():
    assert not unipc_sync_free.sync_free(torch.device("cpu"))
    assert unipc_sync_free.sync_free(torch.device("cuda"))
    reference = trajectory(UniPCMultistepScheduler, 6)
    assert all(torch.equal(a, b) for a, b in zip(reference, trajectory(SyncFreeUniPCMultistepScheduler, 6)))
