"""OpenAI-compatible routes: POST /v1/images/generations and GET /v1/models, in OpenAI's request/response and
{"error": {...}} shapes (translation in serving/openai_api.py), so unmodified OpenAI clients work.
"""
# No `from __future__ import annotations`: FastAPI must see real annotation objects.
import asyncio
import logging

from fastapi import APIRouter, Depends, Request

from serving.http.auth import authorize
from serving.openai_api import OpenAIError, OpenAIImageRequest, images_response, models_response, \
    to_generation_request

log = logging.getLogger("ray.serve")
router = APIRouter()


@router.post("/v1/images/generations", summary="OpenAI Images API: create image")
async def openai_generate(body: OpenAIImageRequest, request: Request, caller: str = Depends(authorize)):
    if body.response_format == "url":
        raise OpenAIError(400, "response_format 'url' needs a result store; use 'b64_json' (or async jobs: "
                          "POST /v1/jobs)", "response_format", "unsupported_value")
    ingress = request.app.state.ingress
    req = to_generation_request(body)
    name = request.state.model = ingress.check_request(req, openai=True)
    if body.user:
        log.info("openai images request user=%s caller=%s", body.user[:64], caller)
    return images_response(await ingress.call_model(name, req, openai=True))


async def detected_families(request: Request) -> dict[str, str]:
    """Each model's family as its replica detected it (the config usually says 'auto'). Asked once per ingress
    replica and model, from the model deployment's `info`; the config's value while a model cannot answer."""
    ingress = request.app.state.ingress
    known = getattr(request.app.state, "families", None)
    if known is None:
        known = request.app.state.families = {}
    for m in ingress.config.models:
        if m.name in known or m.engine.family != "auto":
            continue
        try:
            info = await asyncio.wait_for(ingress.models[m.name].info.remote(), 5.0)
            if info.get("family"):
                known[m.name] = info["family"]
        except Exception as err:  # noqa: BLE001 - listing models must not fail because one replica is busy/away
            log.info("model %s: family not known yet (%s)", m.name, type(err).__name__)
    return {m.name: known.get(m.name, m.engine.family) for m in ingress.config.models}


@router.get("/v1/models", summary="Served models (OpenAI list shape)")
async def list_models(request: Request, caller: str = Depends(authorize)):
    ingress = request.app.state.ingress
    families = await detected_families(request)
    models = [{"id": m.name, "family": families[m.name], "default": i == 0,
               "noise_model": m.engine.is_noise_model,
               "limits": m.engine.limits.model_dump(), "defaults": m.engine.defaults.model_dump()}
              for i, m in enumerate(ingress.config.models)]
    return models_response(models, ingress.started)
