"""Native generation route: POST /v1/generate (one image as PNG/JPEG/WebP bytes with X-* headers, else JSON).

Errors answer in FastAPI's {"detail": ...} shape (serving/http/errors.py); the request body is the one
GenerationRequest schema shared with jobs, handles and Parquet rows.
"""
# No `from __future__ import annotations`: FastAPI must see real annotation objects.
from fastapi import APIRouter, Depends, Request
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
