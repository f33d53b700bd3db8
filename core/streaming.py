"""Weight streaming: chosen blocks' weights live in pinned host memory and are copied in just ahead of use.

The memory levels stream the UNet's transformer blocks (SDXL: ~85% of its bytes) and the CLIP encoder layers; the
rest stays resident. Each streamed block is packed into one pinned host buffer and computes out of one of a few
device slots that the blocks reuse in turn; a side CUDA stream copies the next blocks in while the current one
computes, ordered by CUDA events only. Peaks and latencies of each level against the resident engine are in
docs/benchmarks.md ("Memory levels"). diffusers' group offloading, the library mechanism, measured about twice as
slow there: per-tensor copies, a host synchronize per group and pageable round trips of the text encoders'
embeddings every call; it stays available as memory.offload=group-block.
"""
from __future__ import annotations

import logging
from functools import partial

from core.stream_slots import GiB, fit_lookahead, module_bytes, slot_plan  # noqa: F401 - slot_plan re-exported

log = logging.getLogger(__name__)
E4M3_MAX = 448.0


def transformer_blocks(unet) -> list:
    """The UNet's transformer blocks in execution order: down, mid, up (the UNet registers mid_block after
    up_blocks, so its named_modules() order is not the call order), registration order within each part."""
    parts = [getattr(unet, "down_blocks", None), getattr(unet, "mid_block", None), getattr(unet, "up_blocks", None)]
    parts = [p for p in parts if p is not None] or [unet]
    return [m for part in parts for name, m in part.named_modules()
            if name.rsplit(".", 2)[-2:-1] == ["transformer_blocks"]]


def pick_streamed(blocks: list, total_bytes: int, share: float) -> list[int]:
    """Indices of the blocks to stream so that about `share` of `total_bytes` streams, spread evenly over the
    blocks (error diffusion by bytes: no long run of streamed blocks whose copies could not hide)."""
    if share <= 0 or not blocks:
        return []
    block_total = sum(module_bytes(b) for b in blocks)
    frac = min(1.0, share * total_bytes / block_total)  # the fraction of the blocks' bytes to stream
    chosen, credit = [], 0.0
    for i, block in enumerate(blocks):
        size = module_bytes(block)
        credit += frac * size
        if credit >= size / 2:
            chosen.append(i)
            credit -= size
    return chosen


CAST_AHEAD = 2  # fp8 storage: blocks cast up ahead of the one computing (compute-dtype work slots: CAST_AHEAD + 1)


class WeightStreamer:
    """Streams the weights of `blocks` (called in this cyclic order, each exactly once per model call).

    Each block's tensors are packed into one pinned host buffer per dtype, and point permanently at views of a
    device slot (a few slots, reused in turn): loading a block is one copy into its slot on a side stream, with no
    per-tensor host work. Per-tensor copies and pointer swaps cost ~0.7 ms of host time per block, which stalled
    the (host-bound) eager SDXL loop (experiments/benchmark-history.md). Block i's pre-hook makes the
    compute stream wait for its copy and starts the copies of the next `lookahead` blocks, each after the compute
    stream has released the slot it reuses (events only: the host never waits).

    store_fp8: the blocks' matrices are kept (and copied) as e4m3 with one scale per tensor: half the bytes over
    PCIe and in pinned memory; images change (PSNR in docs/benchmarks.md). They land in fp8 staging slots
    (lookahead + 1) and a second side stream casts each block up into one of a few compute-dtype work slots just
    ahead of its use, so the copy engine never waits for a cast kernel (queued behind the compute stream's kernels
    for SMs) as it did when both shared one stream. No faster than fp16 streaming where measured: opt-in."""

    def __init__(self, blocks: list, device, lookahead: int = 2, store_fp8: bool = False):
        import torch

        fp8 = torch.float8_e4m3fn
        self.device = torch.device(device)
        self.blocks = blocks
        self.lookahead = max(1, min(lookahead, len(blocks) - 1)) if len(blocks) > 1 else 0
        self.cast_ahead = min(CAST_AHEAD, self.lookahead)
        self.slot_of = slot_plan(len(blocks), self.lookahead)  # copy targets: fp8 staging, exact tensors
        self.work_of = slot_plan(len(blocks), self.cast_ahead)  # fp8 storage: where blocks are cast up to
        self.stream = torch.cuda.Stream(self.device)
        self.cast_stream = torch.cuda.Stream(self.device) if store_fp8 else None
        pinned = torch.cuda.is_available()  # (CPU-only hosts, tests: plain host memory)
        self.host: list[dict] = []  # per block: (dtype, fp8) -> packed host buffer
        self.scaled: list[tuple[list, list]] = []  # per block: fp8-stored tensors and their scales
        layouts = []
        for block in blocks:
            sizes, layout, scaled = {}, [], ([], [])
            for t in (*block.parameters(), *block.buffers()):
                key = (t.dtype, store_fp8 and t.is_floating_point() and t.dim() >= 2)  # matrices only: norms, biases
                layout.append((t, key, sizes.get(key, 0), t.shape))                   # stay exact
                sizes[key] = sizes.get(key, 0) + t.numel()
            host = {key: torch.empty(n, dtype=fp8 if key[1] else key[0], pin_memory=pinned)
                    for key, n in sizes.items()}
            for t, key, off, _ in layout:
                src = t.data.reshape(-1)
                if key[1]:  # per-tensor scale: the largest magnitude maps to e4m3's largest finite value
                    scale = max(src.abs().max().item(), 1e-12) / E4M3_MAX
                    src = (src.float() / scale).to(fp8)
                    scaled[0].append(t)
                    scaled[1].append(scale)
                host[key][off:off + t.numel()].copy_(src)
            self.host.append(host)
            self.scaled.append(scaled)
            layouts.append(layout)
        widest: dict = {}
        for host in self.host:
            for key, h in host.items():
                widest[key] = max(widest.get(key, 0), h.numel())
        # copy slots hold a block's exact tensors and its fp8 bytes; work slots its cast-up matrices
        self.slots = [{key: torch.empty(n, dtype=fp8 if key[1] else key[0], device=self.device)
                       for key, n in widest.items()} for _ in range(max(self.slot_of, default=0) + 1)]
        self.work = [{key: torch.empty(n, dtype=key[0], device=self.device) for key, n in widest.items() if key[1]}
                     for _ in range(max(self.work_of, default=0) + 1)] if store_fp8 else []
        for i, layout in enumerate(layouts):  # the tensors live in their slot from now on (host copies above)
            home = self.work[self.work_of[i]] if store_fp8 else {}
            slot = self.slots[self.slot_of[i]]
            for t, key, off, shape in layout:
                t.data = (home if key[1] else slot)[key][off:off + t.numel()].view(shape)
        self.scaled = [([t.data for t in tensors], scales) for tensors, scales in self.scaled]  # slot views
        self.slot_free: dict[int, object] = {}  # copy slot -> event: the compute stream is done with its last block
        self.work_free: dict[int, object] = {}  # work slot -> the same, for the cast-up copies
        self.copied: dict[int, object] = {}  # block -> event: its copy into its slot is done
        self.ready: dict[int, object] = {}  # block -> event: it can compute (copied, and cast up with fp8)
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(partial(self._before, i))
            block.register_forward_hook(partial(self._after, i))
        self.block_bytes = [sum(h.numel() * h.element_size() for h in host.values()) for host in self.host]
        self.streamed_bytes = sum(self.block_bytes)
        self.copied_bytes = 0  # running total of bytes copied in (benchmarks read the copy bound off it)

    def _load(self, i: int) -> None:
        import torch

        slot = self.slot_of[i]
        for j in [j for j in self.copied if self.slot_of[j] == slot]:
            self.copied.pop(j)  # its copy is about to be overwritten (only after a call broke off mid-forward)
            self.ready.pop(j, None)
        with torch.cuda.stream(self.stream):
            if slot in self.slot_free:
                self.stream.wait_event(self.slot_free[slot])
            for key, h in self.host[i].items():
                self.slots[slot][key][: h.numel()].copy_(h, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.copied[i] = event
        if self.cast_stream is None:
            self.ready[i] = event
        self.copied_bytes += self.block_bytes[i]

    def _cast(self, i: int) -> None:
        """fp8 storage: cast block i's staged bytes up into its work slot and rescale each tensor (2 kernels)."""
        import torch

        work = self.work_of[i]
        for j in [j for j in self.ready if self.work_of[j] == work]:
            del self.ready[j]  # as in _load
        with torch.cuda.stream(self.cast_stream):
            self.cast_stream.wait_event(self.copied[i])
            if work in self.work_free:
                self.cast_stream.wait_event(self.work_free[work])
            for key, h in self.host[i].items():
                if key[1]:
                    self.work[work][key][: h.numel()].copy_(self.slots[self.slot_of[i]][key][: h.numel()])
            if self.scaled[i][0]:  # one multi-tensor kernel, not one launch per tensor
                torch._foreach_mul_(*self.scaled[i])
            event = torch.cuda.Event()
            event.record(self.cast_stream)
        self.ready[i] = event

    def _before(self, i: int, module, args):
        import torch

        n = len(self.blocks)
        for j in [(i + k) % n for k in range(self.lookahead + 1)]:
            if j not in self.copied:  # i itself: first call, or the chain was broken (an exception mid-forward)
                self._load(j)
        if self.cast_stream is not None:
            for j in [(i + k) % n for k in range(self.cast_ahead + 1)]:
                if j not in self.ready:
                    self._cast(j)
        torch.cuda.current_stream(self.device).wait_event(self.ready[i])

    def _after(self, i: int, module, args, output):
        import torch

        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.slot_free[self.slot_of[i]] = event
        if self.cast_stream is not None:
            self.work_free[self.work_of[i]] = event
        self.copied.pop(i, None)
        self.ready.pop(i, None)


def place_streamed(model, blocks: list, device, lookahead: int = 2, store_fp8: bool = False) -> WeightStreamer | None:
    """Stream `blocks` of `model` and put everything else on the device. The streamed blocks go to pinned host
    memory first and only the rest is copied (no transient peak of the whole model)."""
    streamed = {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}
    streamer = WeightStreamer(blocks, device, lookahead, store_fp8) if blocks else None
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in streamed:
            t.data = t.data.to(device)
    return streamer


def stream_unet_share(unet, device, share: float, lookahead: int = 2,
                      store_fp8: bool = False) -> WeightStreamer | None:
    """Keep the UNet resident except an evenly spread `share` of its weight bytes, streamed per call."""
    blocks = transformer_blocks(unet)
    picked = pick_streamed(blocks, module_bytes(unet), share)
    # Every block ahead takes a block-sized slot (SD1.5 streams 16: 3 ahead; SDXL 70: 9, BALANCED's 50: 9); more
    # ahead than that cost VRAM for no measurable gain (docs/benchmarks.md, "Memory levels")
    lookahead = fit_lookahead(len(picked), lookahead)
    streamer = place_streamed(unet, [blocks[i] for i in picked], device, lookahead, store_fp8)
    if streamer:
        log.info("streaming %d of %d transformer blocks, %d ahead (%.2f GiB copied per UNet call%s; UNet %.2f GiB)",
                 len(picked), len(blocks), streamer.lookahead, streamer.streamed_bytes / GiB,
                 ", fp8" if store_fp8 else "", module_bytes(unet) / GiB)
    return streamer


def stream_text_encoder(encoder, device, lookahead: int = 2) -> WeightStreamer | None:
    """A CLIP text encoder with every encoder layer streamed (embeddings and final norm resident): the layers are
    ~90% of its bytes and run once per prompt, so their copies are cheap next to a denoising loop."""
    # CLIP's layers sit at text_model.encoder.layers or (newer transformers) encoder.layers
    layers = next((m for name, m in encoder.named_modules() if name.endswith("encoder.layers")), [])
    return place_streamed(encoder, list(layers), device, lookahead)
