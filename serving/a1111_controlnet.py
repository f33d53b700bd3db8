"""A1111's ControlNet extension (sd-webui-controlnet) API: `alwayson_scripts.controlnet.args` -> `control`.

Each unit of `args` is the extension's ControlNetUnit as JSON. Mapped: `image` (or the older `input_image`;
base64 or a data: URL, or {"image": ..., "mask": null}), `model` ("name [hash]" -> name, as GET
/v1/controlnets lists it), `module` (preprocessor: none -> the image is the map, canny -> edges computed
in-process), `weight` -> scale, `guidance_start` / `guidance_end` -> start / end, `enabled` (false: the unit is
skipped). Refused with a 422 naming the unit's field: other preprocessors, a unit mask, control modes other than
Balanced. Tuning keys with no effect here (pixel_perfect, processor_res, threshold_a/b, resize_mode, lowvram...)
are accepted and listed in `info.sdserve_ignored`.

Pure: no FastAPI, no Ray. Errors are serving.a1111_errors.A1111Error.
"""
from __future__ import annotations

from typing import Any

from serving.a1111_errors import A1111Error

PREFIX = "alwayson_scripts.controlnet.args"
SCRIPT_NAMES = ("controlnet", "ControlNet")
MODULES = {"none": "none", "canny": "canny"}
MAPPED = {"enabled", "image", "input_image", "module", "model", "weight", "guidance_start", "guidance_end",
          "control_mode"}
# Keys a client sends with their defaults (webuiapi's ControlNetUnit.to_dict): accepted, listed as ignored
# only when they differ from these defaults.
INERT_DEFAULTS: dict[str, Any] = {"resize_mode": "Crop and Resize", "low_vram": False, "lowvram": False,
                                  "processor_res": 512, "threshold_a": 64, "threshold_b": 64, "pixel_perfect": False,
                                  "guessmode": False, "hr_option": "Both", "save_detected_map": True,
                                  "mask": None, "effective_region_mask": None, "inpaint_crop_input_image": False}
BALANCED = (0, "Balanced", None)


def _error(field: str, message: str) -> A1111Error:
    return A1111Error(field, f"{field}: {message}")


def model_name(title: str) -> str:
    """'control_v11p_sd15_canny [d14c016b]' -> 'control_v11p_sd15_canny' (the extension's model titles)."""
    key = title.strip()
    if key.endswith("]") and " [" in key:
        key = key[: key.rindex(" [")]
    for suffix in (".safetensors", ".pth", ".ckpt"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    return key


def control_units(scripts: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """(the request's `control` list, the ignored keys) from `alwayson_scripts`; other scripts are refused."""
    control: list[dict[str, Any]] = []
    ignored: list[str] = []
    for name, script in scripts.items():
        if name not in SCRIPT_NAMES:
            raise _error(f"alwayson_scripts.{name}", "always-on script not supported by sdserve (only controlnet)")
        args = script.get("args", []) if isinstance(script, dict) else None
        if not isinstance(args, list):
            raise _error(f"alwayson_scripts.{name}.args", "must be a list of ControlNet units")
        for i, unit in enumerate(args):
            where = f"{PREFIX}.{i}"
            if not isinstance(unit, dict):
                raise _error(where, "a ControlNet unit must be an object")
            if not unit.get("enabled", True):
                continue
            control.append(_unit(unit, where))
            ignored += [f"{where}.{k}" for k in sorted(unit) if k not in MAPPED
                        and unit[k] != INERT_DEFAULTS.get(k, object())]
    return control, ignored


def _unit(unit: dict[str, Any], where: str) -> dict[str, Any]:
    image = unit.get("image", unit.get("input_image"))
    if isinstance(image, dict):  # {"image": b64, "mask": b64 | None} (the extension's newer shape)
        if image.get("mask"):
            raise _error(f"{where}.image.mask", "a ControlNet unit mask is not supported by sdserve")
        image = image.get("image")
    if not isinstance(image, str) or not image:
        raise _error(f"{where}.image", "each enabled unit needs an image (base64 or a data: URL); sdserve does not "
                                       "take the img2img init image as the control image")
    module = str(unit.get("module") or "none").strip().lower()
    if module not in MODULES:
        raise _error(f"{where}.module", f"preprocessor {unit.get('module')!r} is not supported; available: "
                                        f"{', '.join(MODULES)} (send an already preprocessed map with 'none')")
    model = unit.get("model")
    if not isinstance(model, str) or not model.strip() or model.strip().lower() == "none":
        raise _error(f"{where}.model", "each enabled unit needs a ControlNet model (GET /controlnet/model_list)")
    if unit.get("control_mode", 0) not in BALANCED:
        raise _error(f"{where}.control_mode", "only control_mode 0 (Balanced) is supported by sdserve")
    out: dict[str, Any] = {"model": model_name(model), "image": image, "preprocess": MODULES[module]}
    for ours, theirs in (("scale", "weight"), ("start", "guidance_start"), ("end", "guidance_end")):
        if unit.get(theirs) is not None:
            out[ours] = unit[theirs]
    return out


# Our control field -> the unit's (errors coming back name the A1111 field).
UNIT_FIELD = {"scale": "weight", "start": "guidance_start", "end": "guidance_end", "model": "model",
              "image": "image", "preprocess": "module"}


def a1111_control_field(ours: str) -> str | None:
    """'control.0.scale' -> 'alwayson_scripts.controlnet.args.0.weight' (None when not a control field).

    The index is the position among the ENABLED units (disabled ones are skipped), which is the unit's position in
    args whenever no unit before it is disabled."""
    parts = ours.split(".")
    if parts[0] != "control":
        return None
    if len(parts) == 1:
        return PREFIX
    tail = ".".join(UNIT_FIELD.get(p, p) for p in parts[2:])
    return f"{PREFIX}.{parts[1]}" + (f".{tail}" if tail else "")
