"""Opt-in DeepCache-style step caching for diffusers' UNet2DConditionModel (Ma et al. 2023, arXiv:2312.00858).

The deep, low-resolution UNet features change little between adjacent denoising steps. So:

- a FULL step (the first `first_full_steps` UNet calls of a pipeline call, then every `interval`-th) runs the
  whole UNet and keeps the hidden state that enters the last (shallowest) up block;
- a SHALLOW step runs only the time embedding, conv_in and down_blocks[0] on the new latents, then
  up_blocks[-1] on the cached deep state plus those fresh skip features, then the output convs.

Images change: a quality/speed trade, opt-in (`optimization.step_cache`); benchmarks/gpu_bench.py reports the
pixel difference next to the speed. diffusers' own cache hooks (first_block_cache, faster_cache, ...) target
transformer blocks; UNet2DConditionModel has no CacheMixin, hence this module.

Why the step functions are compiled instead of the UNet: `nn.Module.compile()` compiles `__call__`, which would
trace this hook's `new_forward`, and its full/shallow choice (a counter that changes every call) would become
guards: a recompile, and with reduce-overhead a CUDA graph, per step index. With compile on, the whole-UNet
compile is dropped and the two step functions are compiled (same mode, fullgraph); the choice stays eager.
"""
from __future__ import annotations

import inspect
import logging

import torch
from diffusers.hooks import HookRegistry, ModelHook

log = logging.getLogger(__name__)
HOOK = "sdserve_step_cache"
CAPTURE_HOOK = "sdserve_step_cache_capture"
# Inputs a shallow step cannot honour (ControlNet / T2I-Adapter residuals act on the deep blocks): full step.
DEEP_ONLY_KWARGS = ("down_block_additional_residuals", "mid_block_additional_residual",
                    "down_intrablock_additional_residuals")


class CaptureDeepFeature(ModelHook):
    """On up_blocks[-1]: while a full step runs, keep the hidden state entering the block."""

    def __init__(self, owner: "StepCacheHook"):
        super().__init__()
        self.owner = owner

    def pre_forward(self, module, *args, **kwargs):
        if self.owner.capturing:
            self.owner.captured = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return args, kwargs


class StepCacheHook(ModelHook):
    """On the UNet: picks a full or a shallow step per call. Stateful.

    Two ways to drive it: by its own call counter (`reset()` starts a new denoising run: `is_full_step(count)`),
    or, as the engine's step scheduler does, by `plan = (full, deep)` set before each call: samples at different
    steps share calls there, so each sample's phase comes from its own step index (the scheduler groups samples
    by phase) and each sample keeps its own rows of the deep feature (`deep`: the rows gathered for this call).
    After a full call `deep` holds the whole call's feature, for the engine to split per sample."""

    _is_stateful = True

    def __init__(self, interval: int, first_full_steps: int):
        super().__init__()
        self.interval, self.first_full_steps = interval, first_full_steps
        self.unet = None
        self.signature = None
        self.capturing = False
        self.captured = None  # set by CaptureDeepFeature during a full step
        self.full_fn, self.shallow_fn = self.full_step, self.shallow_step  # replaced by compiled versions
        self.reset()

    def initialize_hook(self, module):
        self.unet = module
        # forward's own signature (apply_lora_scale keeps it via functools.wraps), to bind positional args.
        self.signature = inspect.signature(type(module).forward)
        return module

    def reset(self) -> None:
        self.plan = None  # (full, deep rows) for the next call, set by core/unet_step.py; None: own counter
        self.step = 0
        self.deep = None  # the cached hidden state entering up_blocks[-1]
        self.full_calls = self.shallow_calls = 0

    def reset_state(self, module):
        self.reset()
        return module

    def is_full_step(self, step: int) -> bool:
        return step < self.first_full_steps or step % self.interval == 0

    def new_forward(self, module, *args, **kwargs):
        bound = self.signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.pop("self", None)
        step, self.step = self.step, self.step + 1
        plan, self.plan = self.plan, None
        if plan is not None:  # the engine's step scheduler decided, per sample (see `plan`)
            full, deep = plan
        else:
            full, deep = self.is_full_step(step), self.deep
        if full or not self.shallow_possible(call, deep):
            return self.run_full(args, kwargs)
        self.shallow_calls += 1
        return_dict = call.pop("return_dict")
        for name in DEEP_ONLY_KWARGS:
            call.pop(name)
        out = self.shallow_fn(deep=deep, **call)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    def shallow_possible(self, call: dict, deep) -> bool:
        sample = call["sample"]
        if deep is None or deep.shape[0] != sample.shape[0] or deep.shape[-2:] != sample.shape[-2:]:
            return False  # nothing cached for this batch / size (e.g. reset() was not called): run in full
        if any(call[name] is not None for name in DEEP_ONLY_KWARGS):
            return False
        cak = call["cross_attention_kwargs"] or {}
        return "gligen" not in cak and cak.get("scale", 1.0) == 1.0  # LoRA scaling lives in forward's decorator

    def run_full(self, args, kwargs):
        self.full_calls += 1
        self.capturing = True
        try:
            out, deep = self.full_fn(*args, **kwargs)
        finally:
            self.capturing, self.captured = False, None
        # A copy: with compile mode reduce-overhead the output lives in a CUDA-graph pool that the next replay
        # overwrites (and the clone runs eagerly, outside that pool).
        self.deep = deep.clone()
        return out

    # ------------------------------------------------------------------ the two step functions (compilable)
    def full_step(self, *args, **kwargs):
        """The unchanged UNet forward; also returns the hidden state that entered up_blocks[-1]."""
        out = self.fn_ref.original_forward(*args, **kwargs)
        return out, self.captured

    def shallow_step(self, sample, timestep, encoder_hidden_states, deep, class_labels=None, timestep_cond=None,
                     attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                     encoder_attention_mask=None):
        """UNet2DConditionModel.forward with the deep part (down_blocks[1:], mid, up_blocks[:-1]) replaced by
        `deep`; same helpers and calls as forward, in the same order."""
        unet = self.unet
        if attention_mask is not None:  # masks become additive biases, as in forward
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        if cross_attention_kwargs is not None:
            cross_attention_kwargs = {k: v for k, v in cross_attention_kwargs.items() if k != "scale"}

        # 1. time (+ class / added conditioning: SDXL's text_embeds and time_ids)
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                     added_cond_kwargs=added_cond_kwargs)
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        attn = {"encoder_hidden_states": encoder_hidden_states, "attention_mask": attention_mask,
                "cross_attention_kwargs": cross_attention_kwargs, "encoder_attention_mask": encoder_attention_mask}

        # 2.-3. conv_in and the first down block only. Their outputs are the first entries of forward's
        # down_block_res_samples, the ones up_blocks[-1] consumes (the deeper blocks' skips go to deeper up
        # blocks). The first block's downsampler output is unused: Inductor drops it when compiled.
        hidden = unet.conv_in(sample)
        res = (hidden,)
        first = unet.down_blocks[0]
        if getattr(first, "has_cross_attention", False):
            res += first(hidden_states=hidden, temb=emb, **attn)[1]
        else:
            res += first(hidden_states=hidden, temb=emb)[1]

        # 5. the last up block on the cached deep state. upsample_size stays None: the last block never upsamples.
        up = unet.up_blocks[-1]
        skips = res[: len(up.resnets)]
        if getattr(up, "has_cross_attention", False):
            hidden = up(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, upsample_size=None,
                        encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                        attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask)
        else:
            hidden = up(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, upsample_size=None)

        # 6. post-process
        if unet.conv_norm_out:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


def supported(unet) -> str | None:
    """Why step caching cannot apply to this model (None: it can)."""
    if not (hasattr(unet, "up_blocks") and hasattr(unet, "down_blocks") and hasattr(unet, "get_aug_embed")):
        return f"{type(unet).__name__} is not a diffusers UNet2DConditionModel"
    if unet.config.addition_embed_type == "image_hint":
        return "addition_embed_type image_hint (Kandinsky ControlNet) changes the UNet input"
    if len(unet.up_blocks[-1].resnets) > 1 + len(unet.down_blocks[0].resnets):
        return "up_blocks[-1] takes skip features from deeper than down_blocks[0]"
    return None


def apply_step_cache(unet, interval: int, first_full_steps: int, compile_mode: str | None = None) -> StepCacheHook:
    """Register the hooks on `unet`. With `compile_mode`, replace a whole-UNet compile by compiled step functions."""
    why = supported(unet)
    if why:
        raise ValueError(f"step cache not supported: {why}")
    hook = StepCacheHook(interval, first_full_steps)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(hook, HOOK)
    HookRegistry.check_if_exists_or_initialize(unet.up_blocks[-1]).register_hook(CaptureDeepFeature(hook),
                                                                                  CAPTURE_HOOK)
    if compile_mode:
        from core.optimizations import compile_kwargs

        # nn.Module.compile() keeps torch.compile(self._call_impl) here; None restores the eager __call__ (see the
        # module docstring for why the step functions are compiled instead).
        unet._compiled_call_impl = None
        # dynamic=False as apply_compile: one static graph per shape and batch bucket.
        kwargs = compile_kwargs(compile_mode)
        hook.full_fn = torch.compile(hook.full_step, **kwargs, fullgraph=True, dynamic=False)
        hook.shallow_fn = torch.compile(hook.shallow_step, **kwargs, fullgraph=True, dynamic=False)
    log.info("step cache: full UNet on the first %d steps and every %d-th, shallow otherwise%s", first_full_steps,
             interval, f" (step functions compiled, {compile_mode})" if compile_mode else "")
    return hook


def remove_step_cache(unet) -> None:
    HookRegistry.check_if_exists_or_initialize(unet).remove_hook(HOOK, recurse=False)
    HookRegistry.check_if_exists_or_initialize(unet.up_blocks[-1]).remove_hook(CAPTURE_HOOK, recurse=False)
