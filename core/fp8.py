"""Opt-in FP8 matmuls for the UNet's transformer linears (Hopper and newer).

Two modes (`optimization.fp8`):
  true / dynamic  weights per output row, activations per row at run time (an amax reduction per call).
  static          weights per tensor, activations with one scale per layer calibrated once at load (an eager call
                  at the first warm-up shape), so quantising an activation is a multiply + cast that Inductor can
                  fuse into the kernel producing it. The dynamic mode measured slower than fp16 (docs/benchmarks.md,
                  "FP8"): the per-call reductions cost about what the FP8 GEMMs save.
Convolutions stay in 16-bit. Both change images slightly: docs/benchmarks.md reports the difference.
"""
from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)
E4M3_MAX = 448.0
# Static scales leave headroom over the calibrated amax: activations of other prompts and steps run a little
# larger; past it they saturate at +-448 rather than overflow.
STATIC_HEADROOM = 1.5


def _make_fp8_linear():
    import torch
    from torch import nn

    class FP8Linear(nn.Module):
        def __init__(self, linear: nn.Linear, static: bool = False):
            super().__init__()
            w = linear.weight.detach().float()
            self.static = static
            amax = w.abs().amax() if static else w.abs().amax(dim=1, keepdim=True)  # per tensor / per row
            scale = amax.clamp(min=1e-12) / E4M3_MAX
            self.register_buffer("weight_fp8", (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn))
            self.register_buffer("weight_scale", scale.float() if static else scale.t().contiguous())
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16),
                                                                       requires_grad=False)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            if static:
                self.register_buffer("input_amax", torch.zeros((), device=w.device))
                self.register_buffer("input_scale", torch.ones((), device=w.device))
                self.register_buffer("input_inv_scale", torch.ones((), device=w.device))
                self.calibrating = False

        def forward(self, x):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if self.static and self.calibrating:  # eager, once at load: record the range, compute in 16/32-bit
                self.input_amax = torch.maximum(self.input_amax, x2.detach().abs().amax().float())
                w = self.weight_fp8.to(x.dtype) * self.weight_scale.to(x.dtype)
                bias = None if self.bias is None else self.bias.to(x.dtype)
                return torch.nn.functional.linear(x, w, bias)
            if self.static:
                sx = self.input_scale
                xq = (x2.float() * self.input_inv_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            else:
                sx = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
                xq = (x2.float() / sx).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=sx, scale_b=self.weight_scale,
                                   bias=self.bias, out_dtype=torch.bfloat16)
            return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

        def freeze_calibration(self) -> None:
            scale = self.input_amax.clamp(min=1e-6) * STATIC_HEADROOM / E4M3_MAX
            self.input_scale.copy_(scale)
            self.input_inv_scale.copy_(1.0 / scale)
            self.calibrating = False

    return FP8Linear


def fp8_supported(device: str) -> bool:
    import torch

    return device.startswith("cuda") and torch.cuda.is_available() and \
        torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def apply_fp8(unet, device: str, mode: bool | str = True) -> dict:
    """Swap eligible nn.Linear layers inside the UNet's transformer blocks for FP8Linear."""
    from torch import nn

    if not fp8_supported(device):
        log.warning("fp8 requested but %s has no FP8 tensor cores (needs sm_89+); ignored", device)
        return {"fp8": False}
    FP8Linear = _make_fp8_linear()
    static = mode == "static"
    swapped = 0
    for name, module in list(unet.named_modules()):
        if "transformer_blocks" not in name:
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                setattr(module, child_name, FP8Linear(child, static=static))
                swapped += 1
    log.info("fp8 (%s): %d linear layers swapped", "static" if static else "dynamic", swapped)
    return {"fp8": "static" if static else "dynamic", "fp8_layers": swapped}


def static_layers(unet) -> list:
    return [m for m in unet.modules() if getattr(m, "static", False) and hasattr(m, "freeze_calibration")]


@contextlib.contextmanager
def calibrating(unet):
    """Static FP8: layers record their input range while the block runs (eagerly), then fix their scales."""
    layers = static_layers(unet)
    for layer in layers:
        layer.calibrating = True
    try:
        yield layers
    finally:
        for layer in layers:
            layer.freeze_calibration()
