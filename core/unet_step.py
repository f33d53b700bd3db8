"""One batched UNet call over samples of one group, then each sample's own scheduler step.

Row layout (cond-major): rows 0..n-1 are every sample's conditional row, rows n..n+m-1 the unconditional rows of
the m samples that use classifier-free guidance (guidance <= 1: one row only). The timestep is a float32 tensor of
one value per row and the CFG combine takes a float32 guidance tensor [m, 1, 1, 1]: steps, schedulers, guidance
scales and seeds are data, never shapes or Python constants, so they neither split the call nor retrace a compiled
UNet. When compiled, the rows are padded (last row repeated, outputs dropped) to a row bucket that the warm-up
compiled (core/fastpath.py). Each sample's scheduler runs scale_model_input before the call and step() on its
slice after it, exactly as the pipeline's loop does for a batch of one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.denoise_state import DenoiseSample
from core.img2img import after_step, unet_input


@dataclass
class CallInputs:
    """The per-call tensors that only change when the set of samples changes (cached between steps)."""

    key: tuple
    cfg: list[int]  # positions (in the cond rows) of the samples using CFG
    cfg_index: Any  # the same on the device
    guidance: Any  # float32 [m, 1, 1, 1]
    encoder_hidden_states: Any
    added_cond_kwargs: dict | None
    timestep_cond: Any


def _cat(parts):
    import torch

    return torch.cat(parts) if len(parts) > 1 else parts[0]


def build_inputs(samples: list[DenoiseSample], device, previous: CallInputs | None) -> CallInputs:
    import torch

    key = tuple(id(s) for s in samples)
    if previous is not None and previous.key == key:
        return previous
    conds = [s.job.conditioning for s in samples]
    cfg = [i for i, c in enumerate(conds) if c.uncond is not None]
    rows = conds + [conds[i] for i in cfg]
    hidden = _cat([c.cond for c in conds] + [conds[i].uncond for i in cfg])
    added = None
    if conds[0].cond_pooled is not None:
        added = {"text_embeds": _cat([c.cond_pooled for c in conds] + [conds[i].uncond_pooled for i in cfg]),
                 "time_ids": _cat([c.time_ids for c in rows])}
    tcond = _cat([c.timestep_cond for c in rows]) if conds[0].timestep_cond is not None else None
    from core.device_copy import to_device

    scales = torch.tensor([samples[i].guidance for i in cfg], dtype=torch.float32)
    guidance = to_device(scales, device).view(-1, 1, 1, 1)
    return CallInputs(key, cfg, to_device(torch.tensor(cfg, dtype=torch.long), device), guidance, hidden, added, tcond)


def pad_rows(tensor, rows: int):
    """`tensor` with its last row repeated up to `rows` rows (a compiled batch bucket)."""
    import torch

    if tensor is None or tensor.shape[0] >= rows:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(rows - tensor.shape[0], *tensor.shape[1:])])


def unet_rows(samples: list[DenoiseSample]) -> int:
    return len(samples) + sum(1 for s in samples if s.cfg)


def denoise_step(engine, samples: list[DenoiseSample], inputs: CallInputs, padded: int,
                 full_step: bool | None) -> None:
    """One UNet call for `samples` (rows padded to `padded`), the CFG combine and every sample's scheduler step.

    full_step: with the step cache on, whether this call runs the whole UNet (all samples share the phase);
    None without step cache. Raises what the UNet raises (CUDA OOM included) before any sample changed."""
    import torch

    n = len(samples)
    scaled4 = [s.scheduler.scale_model_input(s.latents, s.scheduler.timesteps[s.step]) for s in samples]
    scaled = [unet_input(s, x) for s, x in zip(samples, scaled4)]  # + mask channels for a 9-channel UNet
    cfg = inputs.cfg
    latent_in = _cat(scaled + [scaled[i] for i in cfg])
    t_in = torch.stack([s.timesteps[s.step] for s in samples] + [samples[i].timesteps[samples[i].step] for i in cfg])
    control = {}
    if engine.controlnets and any(s.controls for s in samples):
        from core.controlnet import residuals

        with torch.no_grad():
            res = residuals(engine, samples, _cat(scaled4 + [scaled4[i] for i in cfg]), t_in, inputs)
        if res is not None:  # (no kwargs without residuals: a compiled UNet keeps its one signature)
            control = {"down_block_additional_residuals": [pad_rows(r, padded) for r in res[0]],
                       "mid_block_additional_residual": pad_rows(res[1], padded)}
    rows = latent_in.shape[0]
    hook = engine.step_cache
    if hook is not None:
        deep = None
        if not full_step:
            deep = pad_rows(_cat([s.deep[0:1] for s in samples] + [samples[i].deep[1:2] for i in cfg]), padded)
        hook.plan = (bool(full_step), deep)
    added = inputs.added_cond_kwargs
    if added is not None:
        added = {k: pad_rows(v, padded) for k, v in added.items()}
    captured = getattr(engine, "captured_step", None)  # optimization.capture_step (core/captured_step.py)
    if captured is not None and hook is None and captured.accepts(samples, padded):
        return captured.run(samples, inputs, latent_in, t_in, padded, pad_rows, added)
    with torch.no_grad():
        out = engine.pipe.unet(pad_rows(latent_in, padded), pad_rows(t_in, padded),
                               encoder_hidden_states=pad_rows(inputs.encoder_hidden_states, padded),
                               timestep_cond=pad_rows(inputs.timestep_cond, padded), cross_attention_kwargs=None,
                               added_cond_kwargs=added, return_dict=False, **control)[0][:rows]
        if hook is not None and full_step:
            deep = hook.deep  # [padded, ...]: keep each sample's own rows for its shallow steps
            uncond_row = {j: n + k for k, j in enumerate(cfg)}
            for j, s in enumerate(samples):
                parts = [deep[j:j + 1]] + ([deep[uncond_row[j]:uncond_row[j] + 1]] if j in uncond_row else [])
                s.deep = _cat(parts)
        noise = out[:n]
        if cfg:
            uncond = out[n:]
            every = len(cfg) == n  # (cfg lists positions in order: then it is 0..n-1)
            text = noise if every else noise.index_select(0, inputs.cfg_index)
            guided = uncond + inputs.guidance * (text - uncond)  # float32, as the pipeline's Python float scale
            if every:  # every row guided: no gather/scatter (3 kernels fewer, the same values)
                noise = guided.to(noise.dtype)
            else:
                noise = noise.clone()
                noise.index_copy_(0, inputs.cfg_index, guided.to(noise.dtype))
        for i, s in enumerate(samples):
            t = s.scheduler.timesteps[s.step]
            s.latents = s.scheduler.step(noise[i:i + 1], t, s.latents, **s.step_kwargs, return_dict=False)[0]
            s.step += 1
            after_step(s)  # inpainting with a 4-channel UNet: blend the kept area back
