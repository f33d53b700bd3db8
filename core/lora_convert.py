"""LoRA files -> per-layer (down, up, scale) for the model's own module names, checked against the model.

Both key layouts are read:
- kohya/A1111: `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (`lora_te_`,
  `lora_te1_`, `lora_te2_` for the text encoders). SDXL files name the UNet's blocks as the original (sgm) UNet
  does (`input_blocks_4_1_...`): diffusers' own mapping renames them first. The module is then found by its
  underscored name in a table built from the model, so no hand-written renaming rules can drift.
- diffusers/PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (also `.lora.down/up`, PEFT `.default`, the
  old attention-processor `to_q_lora` names); alpha from `<module>.alpha` keys or the `lora_adapter_metadata`
  (lora_alpha / r) that diffusers' save_lora_weights writes.

scale = alpha / rank (1 without an alpha), as kohya and PEFT apply it. Every layer must exist in the model with
matching shapes, else LoraMismatch says which (a LoRA for another base model fails here).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                "lora_te2_": "text_encoder_2"}
DIFFUSERS_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_A.default.weight", ".lora_B.default.weight"),
                   (".lora.down.weight", ".lora.up.weight"), (".lora_linear_layer.down.weight",
                                                              ".lora_linear_layer.up.weight"))
OLD_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
OLD_TEXT = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


class LoraMismatch(ValueError):
    """The LoRA does not fit this model (layers missing or shaped differently): another base model."""


@dataclass(frozen=True)
class LayerShape:
    kind: str  # linear | conv
    in_features: int
    out_features: int
    kernel: tuple[int, int] = (1, 1)


def model_layers(pipe) -> dict[tuple[str, str], LayerShape]:
    """Every Linear and Conv2d of the pipeline's UNet and text encoders, by (component, module name)."""
    import torch

    out = {}
    for comp in COMPONENTS:
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                out[(comp, name)] = LayerShape("conv", m.in_channels, m.out_channels, tuple(m.kernel_size))
            elif isinstance(m, torch.nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features")):
                out[(comp, name)] = LayerShape("linear", int(m.in_features), int(m.out_features))
    return out


def _kohya_pairs(tensors: dict, unet_config) -> dict[tuple[str, str], tuple]:
    if unet_config is not None and any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks",
                                                     "lora_unet_middle_block")) for k in tensors):
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

        tensors = _maybe_map_sgm_blocks_to_diffusers(dict(tensors), unet_config)
    pairs = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            if not key.endswith((".lora_up.weight", ".alpha")):
                raise LoraMismatch(f"unsupported key {key!r} (LyCORIS/DoRA variants are not supported)")
            continue
        lora_name = key[:-len(".lora_down.weight")]
        prefix = next((p for p in KOHYA_PREFIX if lora_name.startswith(p)), None)
        if prefix is None:
            raise LoraMismatch(f"unsupported key {key!r}")
        up = tensors.get(lora_name + ".lora_up.weight")
        if up is None:
            raise LoraMismatch(f"{lora_name}: lora_down without lora_up")
        alpha = tensors.get(lora_name + ".alpha")
        pairs[(KOHYA_PREFIX[prefix], "kohya:" + lora_name[len(prefix):])] = (
            down, up, None if alpha is None else float(alpha))
    return pairs


def _diffusers_pairs(tensors: dict, metadata: dict) -> dict[tuple[str, str], tuple]:
    try:
        adapter_meta = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        adapter_meta = {}
    pairs = {}
    for key, down in tensors.items():
        pair = next(((d, u) for d, u in DIFFUSERS_PAIRS if key.endswith(d)), None)
        if pair is None:
            continue
        module = key[:-len(pair[0])]
        up = tensors.get(module + pair[1])
        if up is None:
            raise LoraMismatch(f"{module}: down-projection without up-projection")
        comp = module.split(".", 1)[0]
        if comp in COMPONENTS:
            module = module.split(".", 1)[1]
        else:
            comp = "unet"
        alpha = tensors.get(key[:-len(pair[0])] + ".alpha")
        if alpha is None and f"{comp}.lora_alpha" in adapter_meta:
            alpha_pattern = adapter_meta.get(f"{comp}.alpha_pattern") or {}
            alpha = next((v for k, v in alpha_pattern.items() if module.endswith(k)),
                         adapter_meta[f"{comp}.lora_alpha"])
        if ".processor." in module or module.rsplit(".", 1)[-1] in OLD_PROCESSOR:
            head, _, last = module.replace(".processor.", ".").rpartition(".")
            module = f"{head}.{(OLD_TEXT if comp != 'unet' else OLD_PROCESSOR).get(last, last)}"
        pairs[(comp, module)] = (down, up, None if alpha is None else float(alpha))
    if not pairs:
        raise LoraMismatch("no LoRA weight pairs found")
    return pairs


def convert(tensors: dict, metadata: dict, layout: str, layers: dict[tuple[str, str], LayerShape],
            unet_config=None, targets: set[str] | None = None) -> dict[tuple[str, str], tuple]:
    """{(component, module): (down [r, in(, kh, kw)], up [out, r], scale)}, float32 on the CPU, checked against
    `layers` (model_layers). targets: the UNet modules that have adapter slots (others are refused)."""
    import torch

    if layout == "kohya":
        by_flat = {(comp, name.replace(".", "_")): name for comp, name in layers}
        raw = _kohya_pairs(tensors, unet_config)
        pairs = {}
        for (comp, flat), value in raw.items():
            name = by_flat.get((comp, flat[len("kohya:"):]))
            if name is None:
                raise LoraMismatch(f"{comp} has no layer {flat[len('kohya:'):]!r}")
            pairs[(comp, name)] = value
    else:
        pairs = _diffusers_pairs(tensors, metadata)
    out = {}
    for (comp, name), (down, up, alpha) in pairs.items():
        shape = layers.get((comp, name))
        if shape is None:
            raise LoraMismatch(f"{comp} has no layer {name!r}")
        if comp == "unet" and targets is not None and name not in targets:
            raise LoraMismatch(f"unet layer {name!r} has no adapter slot (see loras.targets)")
        down, up = down.to(torch.float32), up.to(torch.float32)
        rank = int(down.shape[0])
        if shape.kind == "linear":
            down = down.reshape(rank, -1) if down.dim() == 4 and down.shape[2:] == (1, 1) else down
            ok = down.dim() == 2 and down.shape[1] == shape.in_features
        else:
            down = down.reshape(rank, -1, 1, 1) if down.dim() == 2 else down
            ok = down.dim() == 4 and down.shape[1] == shape.in_features and tuple(down.shape[2:]) == shape.kernel
        up = up.reshape(up.shape[0], -1)
        ok = ok and up.shape == (shape.out_features, rank)
        if not ok:
            raise LoraMismatch(f"{comp} layer {name!r} is {shape.in_features}->{shape.out_features}; the LoRA's "
                               f"weights are shaped {tuple(down.shape)} / {tuple(up.shape)}")
        out[(comp, name)] = (down.contiguous(), up.contiguous(), (alpha / rank) if alpha is not None else 1.0)
    return out
