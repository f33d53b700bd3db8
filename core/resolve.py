"""Resolving a request against its model: defaults filled, the model's limits enforced, input images decoded,
checked and sized (img2img/inpainting: core/img2img.py; ControlNet maps: core/controlnet.py). Runs on the caller's
thread (and on an unloaded engine, for the ingress's early checks): no torch here.
"""
from __future__ import annotations

import secrets

from core import controlnet, img2img
from core.image_inputs import NO_URIS, UriPolicy
from core.schemas import MAX_SEED, GenerationError, GenerationRequest


def resolve_request(engine, req: GenerationRequest, uris: UriPolicy = NO_URIS):
    """(resolved request, ImageConditioning or None, [ControlSpec]). Raises GenerationError(validation, field)."""
    cfg, lim = engine.config, engine.config.limits
    if req.model is not None and req.model != cfg.name:
        raise GenerationError(f"unknown model {req.model!r}; this engine serves {cfg.name!r}", "validation", "model")
    size, images = img2img.prepare(req, cfg.image_inputs, uris)
    w, h, steps, guidance = engine.family_defaults()
    d = cfg.defaults
    fill = {
        "width": req.width or size.get("width") or d.width or w,
        "height": req.height or size.get("height") or d.height or h,
        "steps": req.steps or d.steps or steps,
        "guidance_scale": req.guidance_scale if req.guidance_scale is not None else (
            d.guidance_scale if d.guidance_scale is not None else guidance),
        "scheduler": req.scheduler or cfg.scheduler,
        "negative_prompt": req.negative_prompt if req.negative_prompt is not None else d.negative_prompt,
        "seed": req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1),
        "model": cfg.name,
    }
    checks = [
        ("prompt", len(req.prompt) <= lim.max_prompt_chars, f"at most {lim.max_prompt_chars} characters"),
        ("width", fill["width"] <= lim.max_width, f"must be <= {lim.max_width}"),
        ("height", fill["height"] <= lim.max_height, f"must be <= {lim.max_height}"),
        ("width", fill["width"] * fill["height"] <= lim.max_pixels,
         f"width x height = {fill['width'] * fill['height']} exceeds max_pixels {lim.max_pixels}"),
        ("steps", fill["steps"] <= lim.max_steps, f"must be <= {lim.max_steps}"),
        ("num_images", req.num_images <= lim.max_images_per_request,
         f"must be <= {lim.max_images_per_request}"),
    ]
    for field, ok, why in checks:
        if not ok:
            hint = "" if field not in ("width", "height") or images is None or req.width or req.height else \
                " (the output follows init_image's size: give width/height to resize it)"
            raise GenerationError(f"{field}: {why} for model {cfg.name}{hint}", "validation", field)
    if images is not None:
        fill["strength"] = size["strength"]
    if engine.lora is not None:
        fill.update(engine.lora.resolve(req))  # <lora:...> tags out of the prompt, names and families checked
    elif req.loras or "<lora:" in req.prompt.lower():
        raise GenerationError(f"loras: model {cfg.name} has no LoRA library (engine config `loras.uri`)",
                              "validation", "loras")
    req = req.model_copy(update=fill)
    if images is not None:
        img2img.fit(images, req)
    controls = controlnet.prepare(cfg, req, uris, engine.caches.control_maps) if req.control else []
    return req, images, controls
