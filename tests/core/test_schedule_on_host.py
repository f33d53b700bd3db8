"""Every scheduler steps device latents without a host wait: the schedule (timesteps, sigmas) stays on the CPU.

Run on the `meta` device, where tensors have no data: anything that would make the host wait for the GPU (a
`.item()`, a `nonzero()`, a copy back to the CPU, an `if tensor:`) raises, and so does mixing a non-scalar CPU
tensor with device ones. So these tests check, without a GPU, what the step loop does on CUDA: admission
(`start_sample`) and the steps (`denoise_step`, with classifier-free guidance) for all 18 schedulers.
"""
from __future__ import annotations

import pytest
import torch

from core.denoise_state import Job, TextConditioning, samples_of, start_sample
from core.schedulers import SCHEDULERS
from core.schemas import GenerationRequest
from core.unet_step import build_inputs, denoise_step

META = torch.device("meta")


class _MetaUNet:
    """Stands in for the UNet: a zero prediction of the latents' shape, on their device."""

    def __init__(self, config):
        self.config = config

    def __call__(self, latent, t, **_):
        assert latent.device == META and t.device == META and t.dtype == torch.float32
        return (torch.zeros_like(latent),)


class _Engine:
    def __init__(self, pipe):
        self.pipe = type("Pipe", (), {"unet": _MetaUNet(pipe.unet.config)})()
        self.controlnets, self.step_cache, self.captured_step = None, None, None


def _meta_job(scheduler: str, steps: int) -> Job:
    req = GenerationRequest(prompt="x", scheduler=scheduler, steps=steps, guidance_scale=6.0, width=64, height=64,
                            seed=3, num_images=2)
    job = Job(request=req)
    job.samples = samples_of(job)
    hidden = torch.empty(1, 77, 32, device=META)
    job.conditioning = TextConditioning(hidden, hidden)
    return job


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_runs_on_device_latents_with_the_schedule_on_the_host(engine, scheduler):
    pipe = engine.pipe
    job = _meta_job(scheduler, steps=6)
    for s in job.samples:
        start_sample(s, pipe, engine.family, engine.base_scheduler_config, META, torch.float32)
        assert s.latents.device == META and s.timesteps.device == META  # the UNet's inputs are on the device
        assert s.scheduler.timesteps.device.type == "cpu"  # the schedule is not
    fake = _Engine(pipe)
    inputs = None
    while not all(s.done for s in job.samples):
        inputs = build_inputs(job.samples, META, inputs)
        denoise_step(fake, job.samples, inputs, len(job.samples) * 2, None)
    assert all(s.step == s.total >= 6 for s in job.samples)
    assert all(s.latents.device == META and s.latents.shape == (1, 4, 8, 8) for s in job.samples)


def test_the_meta_device_catches_host_waits():
    """What the test above relies on: on `meta`, what would wait for the GPU raises."""
    from diffusers import EulerDiscreteScheduler

    with pytest.raises(Exception):
        torch.ones(2, device=META).sum().item()
    with pytest.raises(Exception):
        torch.ones(3, device=META).nonzero()
    with pytest.raises(Exception):  # diffusers' set_timesteps(device=...) copies euler's sigmas back to the host
        EulerDiscreteScheduler().set_timesteps(6, device=META)
