"""Native routes: POST /v1/generate (one image as PNG/JPEG/WebP bytes with X-* headers, else JSON) and
GET /v1/loras (each model's LoRA library, asked from its deployment).

Errors answer in FastAPI's {"detail": ...} shape (serving/http/errors.py); the request body is the one
GenerationRequest schema shared with jobs, handles and Parquet rows, as JSON or multipart (serving/http/uploads.py).
"""
# No `from __future__ import annotations`: FastAPI must see real annotation objects.
import asyncio

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from core.schemas import GenerationError, GenerationRequest, GenerationResult
from serving.http.auth import authorize
from serving.http.errors import generation_error
from serving.http.uploads import generation_body, request_body_doc
from serving.image_checks import check_request_images
from serving.payloads import result_json

router = APIRouter()


def image_headers(result: GenerationResult) -> dict[str, str]:
    t = result.timings
    headers = {"X-Seed": str(result.seed), "X-Model": result.model, "X-Width": str(result.width),
               "X-Height": str(result.height), "X-Steps": str(result.steps), "X-Scheduler": result.scheduler,
               "X-Batch-Size": str(result.batch_size),
               "Server-Timing": ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in (
                   ("queue", t.queue_s), ("denoise", t.denoise_s), ("decode", t.decode_s), ("encode", t.encode_s)))}
    if result.note:
        headers["X-Note"] = result.note
    return headers


BODY_DOC = ("The GenerationRequest as JSON (images as base64, data: URLs or allowed URIs), or as multipart/form-data: "
            "a part `request` with the JSON, image files in parts init_image, mask_image, control.<i>.image.")


async def checked_images(body: GenerationRequest, ingress, openai: bool = False) -> GenerationRequest:
    """Every image of the request fetched (an allowed URI becomes its bytes), size-checked and decoded before it is
    queued: a 4xx naming the field."""
    try:
        return await check_request_images(body, ingress.config.image_inputs)
    except GenerationError as err:
        raise generation_error(err, openai) from None


@router.post("/v1/generate", responses={200: {"content": {"image/png": {}, "application/json": {}}}},
             summary="Generate images (PNG/JPEG/WebP bytes for one image, JSON for several)",
             openapi_extra=request_body_doc("GenerationRequest", BODY_DOC))
async def generate(request: Request, caller: str = Depends(authorize),
                   body: GenerationRequest = Depends(generation_body)):
    ingress = request.app.state.ingress
    name = request.state.model = ingress.check_request(body, openai=False)
    body = await checked_images(body, ingress)
    result = await ingress.call_model(name, body, openai=False)
    wants_json = "application/json" in request.headers.get("accept", "")
    if len(result.images) == 1 and not wants_json:
        img = result.images[0]
        return Response(img.data, media_type=img.media_type, headers=image_headers(result))
    return JSONResponse(result_json(result))


@router.get("/v1/loras", summary="LoRAs each model can apply (name, family, rank, size, trigger words, layout)")
async def list_loras(request: Request, model: str | None = Query(None, max_length=128, description="Only this "
                                                                  "model's LoRAs."),
                     caller: str = Depends(authorize)):
    from serving.http.errors import ApiError

    ingress = request.app.state.ingress
    names = [model] if model is not None else list(ingress.models)
    if model is not None and model not in ingress.models:
        raise ApiError(404, {"message": f"unknown model {model!r}; known models: " + ", ".join(ingress.models),
                             "field": "model", "code": "model_not_found"})
    listed = await asyncio.gather(*(ingress.models[n].loras.remote() for n in names))
    return {"loras": [dict(entry, model=n) for n, entries in zip(names, listed) for entry in entries]}
