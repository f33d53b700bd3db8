"""The web playground at `/` (static HTML/CSS/JS shipped in this package) and GET /v1/capabilities.

The page's files live in the serving.playground package (shipped as package data, no build step).

The page uses only relative URLs, so it works under any route_prefix: `/` and `/prefix/` serve it; `/prefix`
(no slash) is redirected to `/prefix/` by Starlette's redirect_slashes, so relative URLs resolve inside it.
"""
# No `from __future__ import annotations`: FastAPI must see real annotation objects after Serve pickles the app.
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from core.schemas import MEDIA_TYPES
from core.schedulers import SCHEDULERS
from serving.http.auth import authorize

ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# The page loads nothing from elsewhere: images are data:/blob: URLs, scripts and styles our own files.
CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def _asset(name: str) -> bytes:
    return resources.files("serving.playground").joinpath(name).read_bytes()


def capabilities(config: Any, jobs_enabled: bool, auth_required: bool) -> dict[str, Any]:
    """What the server offers, for clients that build their forms from it (the playground does).

    Per model, these optional keys appear only when the feature exists (clients show their controls only then):
    `lora_library` (true: the LoRAs are listed by GET /v1/loras?model=<id>), `controlnets` [{name}],
    `image_inputs` (e.g. ["init_image", "mask"]). The page sends them as GenerationRequest's `loras` and image
    fields (core/image_fields.py: init_image, strength, mask_image, control=[{model, image, scale}]).
    """
    models = []
    for i, m in enumerate(config.models):
        e = m.engine
        models.append({"id": m.name, "family": e.family, "default": i == 0, "noise_model": e.is_noise_model,
                       "scheduler": e.scheduler, "limits": e.limits.model_dump(), "defaults": e.defaults.model_dump(),
                       "max_batch_size": e.limits.max_batch_size,
                       "previews": {"method": e.previews.method, "every_n_steps": e.previews.every_n_steps},
                       "image_inputs": ["init_image", "mask"]})  # img2img and inpainting: every model
        if getattr(e, "loras", None) is not None:  # the names live in the library: GET /v1/loras?model=<id>
            models[-1]["lora_library"] = True
        nets = getattr(e, "controlnets", None) or []
        if nets:
            models[-1]["controlnets"] = [{"name": c.name} for c in nets]
    return {"models": models, "default_model": config.default_model, "schedulers": sorted(SCHEDULERS),
            "output_formats": list(MEDIA_TYPES), "jobs": jobs_enabled, "auth_required": auth_required,
            "max_body_bytes": config.security.max_body_bytes,
            "max_image_body_bytes": max(config.image_inputs.max_body_bytes, config.security.max_body_bytes)}


router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground_page():
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/playground/{name}", include_in_schema=False)
async def playground_asset(name: str):
    if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the file system
        return Response(status_code=404)
    return Response(_asset(name), media_type=ASSETS[name], headers=PAGE_HEADERS)


@router.get("/v1/capabilities", summary="Models with their limits and defaults, schedulers, features (jobs, "
            "previews; LoRAs, ControlNets, image inputs when served)")
async def get_capabilities(request: Request, caller: str = Depends(authorize)):
    ingress = request.app.state.ingress
    return capabilities(ingress.config, ingress.jobs is not None, ingress.keys.enabled)
