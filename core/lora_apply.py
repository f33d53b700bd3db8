"""Per-sample LoRA deltas inside one batched UNet call (GPU tier of the adapter caches), and text-encoder LoRAs.

Every targeted UNet layer (core/lora_runtime.unet_targets) gets, once at load, a forward hook and two buffers:
`lora_slot_down` [slots+1, max_rank, in(, kh, kw)] and `lora_slot_up` [slots+1, out, max_rank]. A slot holds one
adapter *set* (a request's LoRAs with their weights: ranks concatenated, alpha/rank and weight folded into up);
slot 0 stays zero (no LoRA). Before each UNet call, `UnetSlots.prepare_call` writes the row -> slot index into the
UNet's `lora_rows` buffer (cond rows, then CFG's uncond rows of the same samples, padding rows -> slot 0) and the
hook adds, for every row b,  delta_b = up[slot_b] @ (down[slot_b] @ x_b)  (batched matmuls; a 3x3/1x1 conv's down
is a grouped conv with one group per row, so convs are per sample too, never split into separate calls).

Why own slots and not diffusers' `enable_lora_hotswap(target_rank=...)` + `load_lora_weights(..., hotswap=True)`:
hotswap keeps one adapter set per *model*, so different sets could never share a UNet call; here a set is data
(slot index per row) and the slot tensors keep their shapes and addresses, so neither torch.compile recompiles nor
CUDA graphs re-record when adapters change (the slots are written in place).

Cost without LoRAs: eager, a call whose samples have none skips every hook body (`enabled` False); compiled, the
hooks always run (a flag that flipped would retrace), adding rank-`max_rank` matmuls against slot 0. Eager, a call
whose samples all use one adapter set skips the per-row gather: the slot's weights at the set's own rank (`single`).
"""
from __future__ import annotations

import collections
import contextlib
import functools

AdapterSet = tuple  # ((name, mtime, weight), ...), sorted; () = no LoRA


class UnetSlots:
    """The GPU tier: `gpu_slots` adapter-set slots on every targeted UNet layer, LRU-replaced."""

    def __init__(self, unet, names: list[str], layers: dict, gpu_slots: int, max_rank: int, max_rows: int,
                 device, dtype, always_on: bool = False):
        import torch

        self.unet, self.max_rank, self.slots = unet, max_rank, gpu_slots
        self.enabled = always_on
        self.always_on = always_on
        self.single: int | None = None  # eager: the one slot every row of this call uses (no per-row gather)
        self.modules = {}
        unet.register_buffer("lora_rows", torch.zeros(max_rows, dtype=torch.long, device=device), persistent=False)
        for name in names:
            shape = layers[("unet", name)]
            module = unet.get_submodule(name)
            extra = shape.kernel if shape.kind == "conv" else ()
            module.register_buffer("lora_slot_down", torch.zeros(gpu_slots + 1, max_rank, shape.in_features,
                                                                 *extra, device=device, dtype=dtype),
                                   persistent=False)
            module.register_buffer("lora_slot_up", torch.zeros(gpu_slots + 1, shape.out_features, max_rank,
                                                               device=device, dtype=dtype), persistent=False)
            hook = _conv_delta if shape.kind == "conv" else _linear_delta
            module.register_forward_hook(functools.partial(hook, self))
            module.lora_name = name
            self.modules[name] = module
        self._slot_of: collections.OrderedDict[AdapterSet, int] = collections.OrderedDict()
        self._used: dict[int, dict[str, int]] = {s: {} for s in range(1, gpu_slots + 1)}  # written rank per layer
        self.writes = 0

    @property
    def slot_bytes(self) -> int:
        return sum(m.lora_slot_down.nbytes + m.lora_slot_up.nbytes for m in self.modules.values())

    def resident_sets(self) -> list[AdapterSet]:
        return list(self._slot_of)

    def assign(self, key: AdapterSet, adapters: list, keep: set) -> int:
        """The slot holding adapter set `key` (adapters: [(LoadedLora, weight)]), writing it into the least
        recently used slot whose set is not in `keep` (the sets of the current call) when it is not resident."""
        if not key:
            return 0
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slot_of.move_to_end(key)
            return slot
        taken = set(self._slot_of.values())
        free = [s for s in range(1, self.slots + 1) if s not in taken]
        if free:
            slot = free[0]
        else:
            victim = next(k for k in self._slot_of if k not in keep)
            slot = self._slot_of.pop(victim)
        self._write(slot, adapters)
        self._slot_of[key] = slot
        return slot

    def _write(self, slot: int, adapters: list) -> None:
        """Copy the set's layers into `slot` (from pinned host memory: asynchronous on CUDA), zeroing what an
        earlier set left beyond the new rank."""
        used = self._used[slot]
        for name, module in self.modules.items():
            down_buf, up_buf = module.lora_slot_down[slot], module.lora_slot_up[slot]
            offset = 0
            for lora, weight in adapters:
                entry = lora.layers.get(("unet", name))
                if entry is None:
                    continue
                down, up, _scale = entry  # scale already folded into up (core/lora_cache.py)
                rank = int(down.shape[0])
                down_buf[offset:offset + rank].copy_(down, non_blocking=True)
                part = up_buf[:, offset:offset + rank]
                part.copy_(up, non_blocking=True)
                if weight != 1.0:
                    part.mul_(weight)
                offset += rank
            before = used.get(name, 0)
            if before > offset:
                down_buf[offset:before].zero_()
                up_buf[:, offset:before].zero_()
            used[name] = offset
        self.writes += 1

    def prepare_call(self, keys: list[AdapterSet], adapters: dict, cfg: list[bool], padded: int) -> None:
        """Row -> slot for one UNet call: `keys` per sample (cond rows), then the CFG samples' uncond rows in the
        same order (core/unet_step.py's row layout), padding rows -> slot 0."""
        import torch

        distinct = {k for k in keys if k}
        self.enabled = self.always_on or bool(distinct)
        self.single = None
        if not self.enabled:
            return
        slot = {k: self.assign(k, adapters[k], distinct) for k in distinct}
        if not self.always_on and len(distinct) == 1 and all(keys):
            # eager, one adapter set for every sample (the common case): the hooks use the slot's own weights at
            # the set's rank, 2 matmuls per layer instead of 2 gathers + 2 batched matmuls at max_rank + an add.
            # (Compiled, the hooks keep one path: a branch that flipped would retrace.)
            self.single = slot[next(iter(distinct))]
            return
        rows = [slot.get(k, 0) for k in keys] + [slot.get(k, 0) for k, c in zip(keys, cfg) if c]
        rows += [0] * (padded - len(rows))
        host = torch.tensor(rows, dtype=torch.long)
        # from pinned memory: a non_blocking copy from pageable memory may still wait for the GPU
        self.unet.lora_rows[:padded].copy_(host.pin_memory() if self.unet.lora_rows.is_cuda else host,
                                           non_blocking=True)

    def clear(self) -> None:
        """Drop every resident set and zero the slots (gives nothing back: slot memory is fixed at load)."""
        for module in self.modules.values():
            module.lora_slot_down.zero_()
            module.lora_slot_up.zero_()
        self._slot_of.clear()
        self._used = {s: {} for s in range(1, self.slots + 1)}


def _linear_delta(slots: UnetSlots, module, args, output):
    if not slots.enabled:
        return None
    import torch
    import torch.nn.functional as F

    x = args[0]
    if slots.single is not None:
        rank = slots._used[slots.single].get(module.lora_name, 0)
        if not rank:
            return None  # the set has no delta on this layer
        hidden = F.linear(x, module.lora_slot_down[slots.single, :rank])  # [..., rank]
        up = module.lora_slot_up[slots.single, :, :rank]  # [out, rank]
        out2d = output.reshape(-1, output.shape[-1])
        return torch.addmm(out2d, hidden.reshape(-1, rank), up.t()).view(output.shape)  # output + hidden @ up^T
    rows = x.shape[0]
    index = slots.unet.lora_rows[:rows]
    down = module.lora_slot_down.index_select(0, index)  # [rows, R, in]
    up = module.lora_slot_up.index_select(0, index)  # [rows, out, R]
    hidden = torch.bmm(x.reshape(rows, -1, x.shape[-1]), down.transpose(1, 2))
    return output + torch.bmm(hidden, up.transpose(1, 2)).reshape(output.shape)


def _conv_delta(slots: UnetSlots, module, args, output):
    if not slots.enabled:
        return None
    import torch
    import torch.nn.functional as F

    x = args[0]
    if slots.single is not None:  # one set for every row (see UnetSlots.prepare_call)
        rank = slots._used[slots.single].get(module.lora_name, 0)
        if not rank:
            return None
        hidden = F.conv2d(x, module.lora_slot_down[slots.single, :rank], stride=module.stride,
                          padding=module.padding, dilation=module.dilation)  # [rows, rank, h, w]
        up = module.lora_slot_up[slots.single, :, :rank]  # [out, rank]
        return output + torch.matmul(up, hidden.flatten(2)).view(output.shape)
    rows, channels = x.shape[0], x.shape[1]
    index = slots.unet.lora_rows[:rows]
    down = module.lora_slot_down.index_select(0, index)  # [rows, R, in, kh, kw]
    up = module.lora_slot_up.index_select(0, index)  # [rows, out, R]
    hidden = F.conv2d(x.reshape(1, rows * channels, *x.shape[2:]), down.reshape(-1, *down.shape[2:]),
                      stride=module.stride, padding=module.padding, dilation=module.dilation, groups=rows)
    delta = torch.bmm(up, hidden.reshape(rows, down.shape[1], -1))
    return output + delta.reshape(output.shape)


class TextEncoderLoras:
    """Text-encoder LoRAs: a hook on each text-encoder linear adds the current request's delta while its prompt
    is encoded (one request at a time, on the GPU thread), nothing otherwise."""

    def __init__(self, pipe, layers: dict, device, dtype):
        self.device, self.dtype = device, dtype
        self.current: dict[tuple[str, str], list] = {}
        for (comp, name), shape in layers.items():
            if comp == "unet" or shape.kind != "linear":
                continue
            module = getattr(pipe, comp).get_submodule(name)
            module.register_forward_hook(functools.partial(self._hook, (comp, name)))

    def _hook(self, key, module, args, output):
        parts = self.current.get(key) if self.current else None
        if not parts:
            return None
        x = args[0]
        for down, up in parts:
            output = output + (x @ down.t()) @ up.t()
        return output

    @contextlib.contextmanager
    def active(self, adapters: list):
        """Within: the text encoders carry `adapters` ([(LoadedLora, weight)])."""
        current: dict = {}
        for lora, weight in adapters:
            for (comp, name), (down, up, _scale) in lora.layers.items():
                if comp != "unet" and weight != 0:
                    current.setdefault((comp, name), []).append(
                        (down.to(self.device, self.dtype), up.to(self.device, self.dtype) * weight))
        self.current = current
        try:
            yield
        finally:
            self.current = {}
