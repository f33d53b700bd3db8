"""Opt-in FP8 matmuls for the UNet's transformer linears (Hopper and newer).

Weights are quantized once per output row to float8 e4m3; activations per row at run time (fused by
torch.compile). `torch._scaled_mm` with row-wise scales runs on the FP8 tensor cores at ~2x the bf16 rate.
Convolutions stay in 16-bit. Changes images slightly: docs/benchmarks.md reports the difference.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)
E4M3_MAX = 448.0


def _make_fp8_linear():
    import torch
    from torch import nn

    class FP8Linear(nn.Module):
        def __init__(self, linear: nn.Linear):
            super().__init__()
            w = linear.weight.detach().float()
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX  # (out, 1)
            self.register_buffer("weight_fp8", (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn))
            self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16),
                                                                       requires_grad=False)
            self.in_features, self.out_features = linear.in_features, linear.out_features

        def forward(self, x):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            sx = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
            xq = (x2.float() / sx).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=sx, scale_b=self.weight_scale,
                                   bias=self.bias, out_dtype=torch.bfloat16)
            return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    return FP8Linear


def fp8_supported(device: str) -> bool:
    import torch

    return device.startswith("cuda") and torch.cuda.is_available() and \
        torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def apply_fp8(unet, device: str) -> dict:
    """Swap eligible nn.Linear layers inside the UNet's transformer blocks for FP8Linear."""
    from torch import nn

    if not fp8_supported(device):
        log.warning("fp8 requested but %s has no FP8 tensor cores (needs sm_89+); ignored", device)
        return {"fp8": False}
    FP8Linear = _make_fp8_linear()
    swapped = 0
    for name, module in list(unet.named_modules()):
        if "transformer_blocks" not in name:
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                setattr(module, child_name, FP8Linear(child))
                swapped += 1
    log.info("fp8: %d linear layers swapped", swapped)
    return {"fp8": swapped}
