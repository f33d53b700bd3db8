"""Prototype (optimization.capture_step): the UNet, the CFG combine and the Euler step in one compiled function, so
with compile reduce-overhead a denoising step is one CUDA graph instead of a UNet graph plus ~10 eager kernels
(and their launches) per sample.

Scope: groups whose every sample uses diffusers' EulerDiscreteScheduler predicting epsilon with no churn (the
engine's default `euler`, and `euler_karras`), without step caching. Other groups take the usual path
(core/unet_step.py). DPM++ 2M (multistep history, lower-order final steps) is not captured yet.

Every tensor has the UNet call's padded row count P, so one graph per row bucket serves every mix of samples, CFG
and guidance: row r's CFG partner is `pair[r]` (a conditional row's unconditional row; itself for rows without
CFG, where u + g (c - u) = c exactly), its guidance `g[r]` (1 without CFG), its sigma and next sigma. The math is
diffusers' `EulerDiscreteScheduler.step` written over rows in the same operation order and dtypes, so uncompiled
it gives the same latents bit for bit (tests/core/test_captured_step.py); compiled, Inductor's fused kernels may
round differently (within float noise).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def fused_step(unet, latent_in, t_in, hidden, tcond, added, pair, g, latents, sigma, sigma_next):
    """One UNet call over P rows, CFG, Euler: the next latents of every row (rows past the samples are padding)."""
    import torch

    out = unet(latent_in, t_in, encoder_hidden_states=hidden, timestep_cond=tcond, cross_attention_kwargs=None,
               added_cond_kwargs=added, return_dict=False)[0]
    u = out.index_select(0, pair)
    noise = (u + g * (out - u)).to(out.dtype)  # float32 combine, as core/unet_step.py
    sample = latents.to(torch.float32)  # EulerDiscreteScheduler.step: upcast, epsilon, gamma 0
    pred_original = sample - (sigma * noise).to(noise.dtype)
    derivative = (sample - pred_original) / sigma
    return (sample + derivative * (sigma_next - sigma)).to(noise.dtype)


def capturable(scheduler) -> bool:
    from diffusers import EulerDiscreteScheduler

    return (type(scheduler) is EulerDiscreteScheduler and scheduler.config.prediction_type == "epsilon"
            and scheduler.step_index is not None)


class CapturedStep:
    """The fused step of one engine: compiled like the UNet (same mode) when compile is on, eager otherwise.
    While serving, only row buckets compiled during warm-up are used (others take the usual path: no compile
    mid-serving)."""

    def __init__(self, engine, mode: str | None):
        import torch

        from core.optimizations import compile_kwargs

        self.engine = engine
        self.fn = fused_step if mode is None else torch.compile(fused_step, **compile_kwargs(mode), fullgraph=True,
                                                                 dynamic=False)
        self.rows: set[tuple] = set()  # (width, height, P) compiled during warm-up
        self.calls = 0
        self._tables: tuple | None = None  # (key, pair, g) of the last set of samples

    def accepts(self, samples, padded: int) -> bool:
        if self.engine.step_cache is not None:
            return False
        if not all(not s.step_kwargs.get("s_churn") and capturable(s.scheduler) for s in samples):
            return False
        # The fused function is UNet + CFG + Euler only: ControlNet residuals and 4-channel inpainting's blend
        # after each step (core/img2img.after_step) take the usual path.
        if any(s.controls or (s.image is not None and s.image.mask is not None) for s in samples):
            return False
        shape = (*samples[0].latents.shape[-2:], padded)
        if getattr(self.engine, "_warming", False) or not self.engine.compiled:
            self.rows.add(shape)
            return True
        return shape in self.rows

    def _pair_and_guidance(self, samples, inputs, padded: int, device):
        import torch

        if self._tables is None or self._tables[0] != (inputs.key, padded):
            n = len(samples)
            pair = list(range(padded))
            g = [1.0] * padded
            for k, j in enumerate(inputs.cfg):
                pair[j], g[j] = n + k, float(samples[j].guidance)
            self._tables = ((inputs.key, padded), torch.tensor(pair, device=device),
                            torch.tensor(g, dtype=torch.float32, device=device).view(-1, 1, 1, 1))
        return self._tables[1:]

    def run(self, samples, inputs, latent_in, t_in, padded: int, pad_rows, added) -> None:
        """The step for every sample (latents, step counters, each scheduler's step index advanced)."""
        import torch

        device = latent_in.device
        pair, g = self._pair_and_guidance(samples, inputs, padded, device)
        sig = [s.scheduler.sigmas[s.scheduler.step_index] for s in samples]
        nxt = [s.scheduler.sigmas[s.scheduler.step_index + 1] for s in samples]
        pad = padded - len(samples)
        from core.device_copy import to_device

        # euler keeps its sigmas on the CPU: one pinned copy each, no host wait for the queued steps
        sigma = to_device(torch.stack(sig + [sig[-1]] * pad).to(torch.float32), device).view(-1, 1, 1, 1)
        sigma_next = to_device(torch.stack(nxt + [nxt[-1]] * pad).to(torch.float32), device).view(-1, 1, 1, 1)
        latents = pad_rows(torch.cat([s.latents for s in samples]), padded)
        with torch.no_grad():
            new = self.fn(self.engine.pipe.unet, pad_rows(latent_in, padded), pad_rows(t_in, padded),
                          pad_rows(inputs.encoder_hidden_states, padded), pad_rows(inputs.timestep_cond, padded),
                          added, pair, g, latents, sigma, sigma_next)
        new = new.clone()  # a CUDA-graph output is overwritten by the next replay; samples keep theirs longer
        self.calls += 1
        for i, s in enumerate(samples):
            s.latents = new[i:i + 1]
            s.scheduler._step_index += 1  # what EulerDiscreteScheduler.step does at its end
            s.step += 1


def install(engine) -> CapturedStep | None:
    opt = engine.config.optimization
    if not opt.capture_step:
        return None
    if opt.step_cache is not None:
        log.warning("capture_step does not combine with step_cache: steps are not captured")
        return None
    return CapturedStep(engine, opt.compile if engine.compiled else None)
