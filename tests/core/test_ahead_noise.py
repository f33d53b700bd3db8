"""Step noise drawn ahead (core/ahead_noise.py) gives the very values of per-step draws, so images are unchanged."""
from __future__ import annotations

import pytest
import torch

from core import ahead_noise
from core.schedulers import SCHEDULERS


class _Sample:
    def __init__(self, remaining):
        self.remaining = remaining


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (1, 4, 64, 96), (1, 4, 12, 20)])
def test_draws_ahead_equal_per_step_draws(dtype, shape):
    from diffusers.utils.torch_utils import randn_tensor as diffusers_randn

    steps = 7
    per_step = torch.Generator("cpu").manual_seed(11)
    expected = [diffusers_randn(shape, generator=per_step, dtype=dtype) for _ in range(steps)]
    noise = ahead_noise.step_generator(torch.Generator("cpu").manual_seed(11), _Sample(steps))
    got = [ahead_noise.randn_tensor(shape, generator=noise, device="cpu", dtype=dtype) for _ in range(steps)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert noise._drawn is not None and noise._drawn.shape[0] == steps  # one draw for all steps
    # a draw past the steps counted continues the generator's sequence
    assert torch.equal(ahead_noise.randn_tensor(shape, generator=noise, device="cpu", dtype=dtype),
                       diffusers_randn(shape, generator=per_step, dtype=dtype))


def test_sizes_off_the_16_grid_and_other_generators_take_diffusers_path():
    from diffusers.utils.torch_utils import randn_tensor as diffusers_randn

    noise = ahead_noise.step_generator(torch.Generator("cpu").manual_seed(3), _Sample(4))
    odd = [ahead_noise.randn_tensor((1, 4, 3, 3), generator=noise, dtype=torch.float32) for _ in range(4)]
    ref = torch.Generator("cpu").manual_seed(3)
    assert all(torch.equal(a, diffusers_randn((1, 4, 3, 3), generator=ref)) for a in odd) and noise._drawn is None
    plain = ahead_noise.randn_tensor((2, 4), generator=torch.Generator("cpu").manual_seed(5))
    assert torch.equal(plain, diffusers_randn((2, 4), generator=torch.Generator("cpu").manual_seed(5)))


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m_sde", "lcm", "kdpm2_a", "ddpm", "ddim"])
def test_stochastic_schedulers_match_the_diffusers_pipeline(engine, req, ok, decode, scheduler):
    """The engine (noise drawn ahead) and diffusers' own pipeline (noise drawn per step) give the same image (ddpm,
    ddim: also with the pipeline's clip_sample=False for a scheduler config that does not set it)."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from core.schedulers import make_scheduler

    assert scheduler in SCHEDULERS
    ahead_noise.install()
    out = ok(engine.generate([req(seed=21, scheduler=scheduler, steps=4, guidance_scale=7.5, negative_prompt="")])[0])
    mine = decode(out.images[0].data)
    pipe = StableDiffusionPipeline(**{**engine.pipe.components,
                                      "scheduler": make_scheduler(scheduler, engine.base_scheduler_config)})
    pipe.set_progress_bar_config(disable=True)
    base = req()
    theirs = pipe(prompt=base.prompt, num_inference_steps=4, width=base.width, height=base.height,
                  guidance_scale=7.5, generator=[torch.Generator("cpu").manual_seed(21)],
                  output_type="np").images[0]
    theirs = (theirs * 255).round().astype(np.int16)
    assert np.abs(mine - theirs).max() <= 1, scheduler
