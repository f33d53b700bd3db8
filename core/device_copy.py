"""Host-to-device copies that do not make the host wait for the GPU.

`tensor.to("cuda")` from ordinary (pageable) host memory waits until the GPU has run everything queued before it:
in the step loop that stops the host from queueing the next steps while the UNet runs. From pinned memory with
non_blocking=True the copy is just queued (torch keeps the pinned block until the copy has run).
"""
from __future__ import annotations


def to_device(tensor, device):
    """`tensor` (on the CPU) on `device`, without a host wait when that is a GPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
