"""Native routes: POST /v1/generate (one image as PNG/JPEG/WebP bytes with X-* headers, else JSON) and
GET /v1/loras (each model's LoRA library, asked from its deployment).

Errors answer in FastAPI's {"detail": ...} shape (serving/http/errors.py); the request body is the one
GenerationRequest schema shared with jobs, handles and Parquet rows.
"""
# No `from __future__ import annotations`: FastAPI must see real annotation objects.
import asyncio

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from core.schemas import GenerationRequest, GenerationResult
from serving.http.auth import authorize
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


@router.post("/v1/generate", responses={200: {"content": {"image/png": {}, "application/json": {}}}},
             summary="Generate images (PNG/JPEG/WebP bytes for one image, JSON for several)")
async def generate(body: GenerationRequest, request: Request, caller: str = Depends(authorize)):
    ingress = request.app.state.ingress
    name = request.state.model = ingress.check_request(body, openai=False)
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
