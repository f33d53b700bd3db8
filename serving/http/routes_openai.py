"""OpenAI-compatible routes: POST /v1/images/generations, POST /v1/images/edits (multipart) and GET /v1/models, in
OpenAI's request/response and {"error": {...}} shapes (translation in serving/openai_api.py and
serving/openai_edits.py), so unmodified OpenAI clients work.
"""
# No `from __future__ import annotations`: FastAPI must see real annotation objects.
import asyncio
import logging

from fastapi import APIRouter, Depends, Request

from core.schemas import GenerationError
from serving import openai_edits
from serving.http.auth import authorize
from serving.http.errors import generation_error
from serving.http.uploads import is_multipart, read_form
from serving.image_checks import check_request_images
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


EDIT_FIELDS = {name: {"type": "string"} for name in openai_edits.OpenAIEditRequest.model_fields}
EDIT_BODY_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "prompt"],
    "properties": {"image": {"type": "string", "format": "binary", "description": "The image to edit (PNG, JPEG "
                             "or WebP; exactly one, also accepted as `image[]`)."},
                   "mask": {"type": "string", "format": "binary", "description": "PNG with alpha, same size as "
                            "image: transparent pixels are edited, opaque ones kept."},
                   **{k: {**v, "description": (openai_edits.OpenAIEditRequest.model_fields[k].description or
                                               "OpenAI parameter, accepted and ignored.")}
                      for k, v in EDIT_FIELDS.items()}}}}}}}


async def _edit_parts(request: Request, ingress) -> tuple[dict[str, str], bytes, bytes | None]:
    """(text fields, image bytes, mask bytes or None) of an edits form; 400 naming the part on a mistake."""
    from core.image_inputs import load_bytes

    if not is_multipart(request):
        raise OpenAIError(400, "POST /v1/images/edits takes multipart/form-data (image, mask, prompt, ...)",
                          None, "invalid_content_type")
    form = await read_form(request)
    fields: dict[str, str] = {}
    for name in form.keys():
        if name not in openai_edits.FILE_PARTS:
            values = form.getlist(name)
            if len(values) > 1 or not isinstance(values[0], str):
                raise OpenAIError(400, f"{name}: expected one text value", name, "invalid_value")
            fields[name] = values[0]
    images = [v for part in openai_edits.IMAGE_PARTS for v in form.getlist(part)]
    if len(images) != 1:
        raise OpenAIError(400, f"image: exactly one image is supported here, got {len(images)}", "image",
                          "invalid_value")
    masks = form.getlist("mask")
    if len(masks) > 1:
        raise OpenAIError(400, "mask: one mask at most", "mask", "invalid_value")
    limits, uris = ingress.config.image_inputs.limits, ingress.config.image_inputs.uri_policy()

    async def data(value, param: str) -> bytes:
        if isinstance(value, str):  # a text part: base64, a data: URL or an allowed URI, as in JSON bodies
            try:
                return await asyncio.to_thread(load_bytes, value, param, limits, uris)
            except GenerationError as err:
                raise OpenAIError(400, err.message, param, "invalid_image") from None
        return await value.read()

    return fields, await data(images[0], "image"), (await data(masks[0], "mask") if masks else None)


@router.post("/v1/images/edits", summary="OpenAI Images API: edit an image (img2img; inpainting with a mask)",
             openapi_extra=EDIT_BODY_DOC)
async def openai_edit(request: Request, caller: str = Depends(authorize)):
    ingress = request.app.state.ingress
    fields, image, mask = await _edit_parts(request, ingress)
    body = openai_edits.parse_edit_form(fields)
    if body.response_format == "url":
        raise OpenAIError(400, "response_format 'url' needs a result store; use 'b64_json'", "response_format",
                          "unsupported_value")
    image, mask_png = await asyncio.to_thread(openai_edits.edit_images, image, mask,
                                              ingress.config.image_inputs.limits)
    req = openai_edits.to_generation_request(body, image, mask_png)
    name = request.state.model = ingress.check_request(req, openai=True)
    try:
        req = await check_request_images(req, ingress.config.image_inputs)
    except GenerationError as err:
        raise generation_error(err, openai=True) from None
    if body.user:
        log.info("openai images edit user=%s caller=%s", body.user[:64], caller)
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
