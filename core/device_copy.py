"""Host-to-device copies that do not make the host wait for the GPU.

`tensor.to("cuda")` from ordinary (pageable) host memory waits until the GPU has run everything queued before it:
in the step loop that stops the host from queueing the next steps while the UNet runs. From pinned memory with
non_blocking=True the copy is just queued (torch keeps the pinned block until the copy has run).
"""
from __future__ import annotations

import functools


def to_device(tensor, device):
    """`tensor` (on the CPU) on `device`, without a host wait when that is a GPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class _QueuedHostCopy:
    """A device tensor's copy into pinned host memory, queued behind the work that produces it."""

    def __init__(self, tensor):
        import torch

        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def row(self, index: int):
        self._copied.synchronize()  # the caller's thread waits, not the one queueing GPU work
        return self._host[index].numpy()


class PendingRow:
    """One row of a queued host copy; `host_array(row)` gives its numpy array once the GPU has got there."""

    __slots__ = ("_copy", "_index")

    def __init__(self, copy: _QueuedHostCopy, index: int):
        self._copy, self._index = copy, index

    def wait(self):
        return self._copy.row(self._index)


def rows_to_host(tensor) -> list:
    """The rows of `tensor` as numpy arrays, or on a GPU as PendingRows: `.cpu()` would make the host wait for
    everything queued before it (the next steps' UNet calls included), so the copy is queued instead and the
    thread that needs the pixels (an encoder) waits for it."""
    if tensor.device.type != "cuda":
        return list(tensor.numpy())
    copy = _QueuedHostCopy(tensor)
    return [PendingRow(copy, i) for i in range(tensor.shape[0])]


def host_array(value):
    """A numpy array from rows_to_host's item (waiting for its copy if it is still queued)."""
    return value.wait() if isinstance(value, PendingRow) else value


def _cuda_target(args: tuple, kwargs: dict):
    """The CUDA device a `Tensor.to(...)` call copies to, or None (another device, or only a dtype)."""
    import torch

    target = kwargs.get("device")
    if target is None and len(args) > 1:
        first = args[1]
        target = first.device if isinstance(first, torch.Tensor) else first
    if isinstance(target, (str, int, torch.device)) and not isinstance(target, bool):
        try:
            target = torch.device(target) if not isinstance(target, int) else torch.device("cuda", target)
        except (RuntimeError, TypeError):
            return None
        return target if target.type == "cuda" else None
    return None


def uploads_without_host_wait(device):
    """A context in which copies of ordinary host tensors to the GPU (`t.to("cuda")`, `t.cuda()`,
    `torch.tensor(data, device="cuda")`) go through pinned memory with non_blocking=True, so they are queued
    instead of waiting for the GPU. For code we don't own that copies small host tensors on the GPU thread:
    diffusers' encode_prompt (the tokenizer's ids), SDXL's add_time_ids, scheduler and img2img set-up. A
    TorchFunctionMode sees every torch call in the context, so it wraps admission only, never the steps."""
    import contextlib

    import torch

    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return _queued_uploads_mode()()


@functools.lru_cache(maxsize=None)
def _queued_uploads_mode():
    """The TorchFunctionMode class (made once: admission enters it for every admitted image)."""
    import torch
    from torch.overrides import TorchFunctionMode

    to, cuda, factory = torch.Tensor.to, torch.Tensor.cuda, torch.tensor

    class QueuedUploads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is to or func is cuda:
                src = args[0] if args else None
                if (isinstance(src, torch.Tensor) and src.device.type == "cpu" and "non_blocking" not in kwargs
                        and len(args) <= 3 and not src.is_pinned()
                        and (func is cuda or _cuda_target(args, kwargs) is not None)):
                    return func(src.pin_memory(), *args[1:], **kwargs, non_blocking=True)
            elif func is factory and "device" in kwargs and _cuda_target((None, kwargs["device"]), {}) is not None:
                target = kwargs.pop("device")
                return to_device(func(*args, **kwargs), target)
            return func(*args, **kwargs)

    return QueuedUploads
