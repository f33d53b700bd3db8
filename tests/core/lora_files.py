"""Test helper: LoRAs written with PEFT on the tiny embedded models, saved in diffusers/PEFT and kohya layouts,
and an independent reference (the deltas merged into a copy of the weights)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
KOHYA_TEXT_PREFIX = {"text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def peft_lora(module, targets: list[str], rank: int = 4, seed: int = 0, std: float = 0.3) -> dict:
    """{module name: (A [r, in(,k,k)], B [out, r(,1,1)])} of a PEFT LoRA injected into a copy of `module`, with
    random (non-zero) A and B."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = copy.deepcopy(module)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False),
                            model)
    gen = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(model)
    out: dict = {}
    for key, value in state.items():
        name, part = key.rsplit(".lora_", 1)
        out.setdefault(name, [None, None])[0 if part.startswith("A") else 1] = (
            torch.randn(value.shape, generator=gen) * std)
    return {k: (a, b) for k, (a, b) in out.items()}


def save_diffusers(path: Path, parts: dict[str, dict], alpha: float | None = None, rank: int = 4,
                   metadata: dict | None = None) -> Path:
    """parts: {component: peft_lora(...)} -> unet.<module>.lora_A.weight ... with diffusers' adapter metadata."""
    from safetensors.torch import save_file

    tensors, meta = {}, dict(metadata or {})
    adapter_meta = {}
    for comp, layers in parts.items():
        for name, (a, b) in layers.items():
            tensors[f"{comp}.{name}.lora_A.weight"] = a.contiguous()
            tensors[f"{comp}.{name}.lora_B.weight"] = b.contiguous()
        adapter_meta.update({f"{comp}.r": rank, f"{comp}.lora_alpha": alpha if alpha is not None else rank})
    meta["lora_adapter_metadata"] = json.dumps(adapter_meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def save_kohya(path: Path, parts: dict[str, dict], alpha: float | None = None, metadata: dict | None = None) -> Path:
    """The same LoRA as kohya/A1111 keys: lora_unet_<module with _>.lora_down.weight / lora_up.weight / alpha."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for comp, layers in parts.items():
        prefix = "lora_unet_" if comp == "unet" else KOHYA_TEXT_PREFIX[comp]
        for name, (a, b) in layers.items():
            base = prefix + name.replace(".", "_")
            tensors[base + ".lora_down.weight"] = a.contiguous()
            tensors[base + ".lora_up.weight"] = b.contiguous()
            if alpha is not None:
                tensors[base + ".alpha"] = torch.tensor(float(alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata or {})
    return path


def merge_into(pipe, parts: dict[str, dict], weight: float, scale: float = 1.0) -> None:
    """Reference: W += weight * scale * B @ A on the pipeline's own modules (in place)."""
    import torch

    with torch.no_grad():
        for comp, layers in parts.items():
            model = getattr(pipe, comp)
            for name, (a, b) in layers.items():
                mod = model.get_submodule(name)
                delta = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
                mod.weight += (weight * scale * delta).reshape(mod.weight.shape).to(mod.weight.dtype)


def snapshot(pipe) -> dict:
    return {c: copy.deepcopy(getattr(pipe, c).state_dict()) for c in ("unet", "text_encoder")}


def restore(pipe, saved: dict) -> None:
    for c, state in saved.items():
        getattr(pipe, c).load_state_dict(state)
