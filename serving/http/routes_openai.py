"""OpenAI-compatible routes: POST /v1/images/generations and GET /v1/models, in OpenAI's request/response and
{"error": {...}} shapes (translation in serving/openai_api.py), so unmodified OpenAI clients work.
"""
# No `from __future__ import annotations`: FastAPI must see real annotation objects.
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


@router.get("/v1/models", summary="Served models (OpenAI list shape)")
async def list_models(request: Request, caller: str = Depends(authorize)):
    ingress = request.app.state.ingress
    models = [{"id": m.name, "family": m.engine.family, "default": i == 0,
               "noise_model": m.engine.is_noise_model,
               "limits": m.engine.limits.model_dump(), "defaults": m.engine.defaults.model_dump()}
              for i, m in enumerate(ingress.config.models)]
    return models_response(models, ingress.started)
