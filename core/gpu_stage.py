"""The engine's GPU stage helpers: the one GPU thread's CUDA-graph state, a load stopwatch, VAE decode.

Kept apart from core/engine.py so the engine reads as the request flow; nothing here imports Ray.
"""
from __future__ import annotations

import threading
import time


def own_cudagraph_trees() -> None:
    """Give the GPU thread its own CUDA-graph tree manager. Inductor keeps it in thread-local state set up in
    the thread that imported it (the main one, if something compiled there first); any other thread then fails
    with a bare AssertionError in cudagraph_trees.get_obj on its first reduce-overhead call."""
    try:
        import torch
        from torch._inductor import cudagraph_trees as trees
    except Exception:  # noqa: BLE001 - no inductor: nothing to set up
        return
    if hasattr(trees.local, "tree_manager_containers"):
        return
    init = getattr(trees, "_initialize_tls", None)
    if init is not None:
        init(trees.local)
        return
    import collections

    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", trees.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", trees.local.tree_manager_locks)


class Stopwatch:
    """mark(name) records the seconds since the previous mark under `name`."""

    def __init__(self, into: dict[str, float]):
        self.into, self.last = into, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = round(now - self.last, 2)
        self.last = now


def decode_latents(vae, latents, force_tiling: bool) -> list:
    """VAE decode to HxWx3 uint8 arrays (on a GPU: core.device_copy.PendingRows, see host_array); the float->uint8
    conversion runs on the device (4x less to copy). Runs on the engine's one GPU thread, so the upcast/tiling
    toggles of the shared VAE never race."""
    import torch

    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    upcast = vae.dtype == torch.float16 and getattr(cfg, "force_upcast", False)
    was_tiling = getattr(vae, "use_tiling", False)
    if upcast:
        vae.to(dtype=torch.float32)
    if force_tiling:
        vae.enable_tiling()
    try:
        dtype = next(vae.post_quant_conv.parameters()).dtype
        latents = latents.to(dtype)
        if mean is not None and std is not None:
            m = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            s = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * s / cfg.scaling_factor + m
        else:
            latents = latents / cfg.scaling_factor
        # no_grad, not inference_mode: an AOT-compiled decoder's guards record the grad mode's dispatch keys,
        # and a function compiled under inference_mode fails them after loading in another process.
        with torch.no_grad():
            image = vae.decode(latents, return_dict=False)[0]
            image = torch.nan_to_num(image.float(), nan=-1.0, posinf=1.0, neginf=-1.0)
            image = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            image = image.permute(0, 2, 3, 1).contiguous()
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
        if force_tiling and not was_tiling:
            vae.disable_tiling()
    from core.device_copy import rows_to_host

    return rows_to_host(image)  # on a GPU: copies queued behind the decode, awaited by the encoder threads
