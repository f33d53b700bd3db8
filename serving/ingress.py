"""HTTP ingress (FastAPI via @serve.ingress): native and OpenAI-compatible routes in front of the model deployments.

Native routes answer errors as FastAPI does ({"detail": ...}, 422 field-level); OpenAI routes (/v1/images/*,
/v1/models) answer OpenAI's {"error": {...}} shape with 400/401/404/429/503.
"""
# No `from __future__ import annotations`: FastAPI must see real annotation objects after Serve pickles the class.
import asyncio
import base64
import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from core.schemas import GenerationError, GenerationRequest, GenerationResult
from serving.config import ServingConfig
from serving.openai_api import OPENAI_PARAM, OpenAIError, OpenAIImageRequest, images_response, models_response, \
    to_generation_request
from serving.security import ApiKeys, AuthFailure, Blocklist, BodyLimitMiddleware, RateLimiter, retry_after_header

log = logging.getLogger("ray.serve")

api = FastAPI(title="sdserve", version="0.1.0", description="Stable Diffusion / SDXL image generation on Ray "
              "Serve. Native API (/v1/generate), OpenAI Images API (/v1/images/generations), async jobs (/v1/jobs).")
api.state.max_body_bytes = 64 * 1024
api.add_middleware(BodyLimitMiddleware, limit_of=lambda: api.state.max_body_bytes)
OPENAI_PREFIXES = ("/v1/images/", "/v1/models")


class ApiError(Exception):
    """An error on a native route: rendered as {"detail": ...} with status and headers."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None):
        self.status, self.detail, self.headers = status, detail, headers or {}


def _is_openai(request: Request) -> bool:
    # Substring, not prefix: under a route_prefix the path may carry it.
    return any(p in request.url.path for p in OPENAI_PREFIXES)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    if _is_openai(request):  # the shared checks (auth, rate limit) raise ApiError on OpenAI routes too
        d = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        err = OpenAIError(exc.status, d.get("message", ""), d.get("field"), d.get("code"),
                          _OPENAI_TYPES.get(exc.status, "invalid_request_error"))
        return JSONResponse(err.body(), exc.status, headers=exc.headers)
    return JSONResponse({"detail": exc.detail}, exc.status, headers=exc.headers)


_OPENAI_TYPES = {401: "authentication_error", 429: "rate_limit_exceeded", 503: "server_error", 500: "server_error",
                 504: "server_error"}


@api.exception_handler(OpenAIError)
async def _openai_error(request: Request, exc: OpenAIError):
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    if _is_openai(request):
        e = errors[0] if errors else {}
        loc = [p for p in e.get("loc", ()) if p != "body"]
        param = str(loc[0]) if loc else None
        msg = f"{param}: {e.get('msg')}" if param else str(e.get("msg", "invalid request body"))
        return JSONResponse(OpenAIError(400, msg, OPENAI_PARAM.get(param, param), "invalid_value").body(), 400)
    clean = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
    return JSONResponse({"detail": clean}, 422)


async def authorize(request: Request) -> str:
    """Dependency of every model route: API key (401) then rate limit (429). Returns the caller id."""
    ingress: Ingress = request.app.state.ingress
    try:
        caller = ingress.keys.authenticate(request.headers.get("authorization"))
    except AuthFailure as err:
        raise ApiError(401, {"message": err.message, "code": "invalid_api_key"},
                       {"WWW-Authenticate": "Bearer"}) from None
    caller = caller or f"addr-{request.client.host if request.client else 'unknown'}"
    request.state.caller = caller
    if ingress.limiter is not None:
        wait = ingress.limiter.acquire(caller)
        if wait > 0:
            raise ApiError(429, {"message": f"rate limit exceeded; retry in {wait:.1f}s", "code": "rate_limited"},
                           {"Retry-After": retry_after_header(wait)})
    return caller


def validation_detail(field: str | None, message: str, kind: str = "value_error") -> list[dict]:
    return [{"loc": ["body", field] if field else ["body"], "msg": message, "type": kind}]


def result_json(result: GenerationResult) -> dict[str, Any]:
    data = result.model_dump(exclude={"images"})
    data["images"] = [{"b64_json": base64.b64encode(i.data).decode(), "seed": i.seed, "media_type": i.media_type}
                      for i in result.images]
    data["seeds"] = [i.seed for i in result.images]
    return data


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


import serving.jobs.routes  # noqa: E402,F401 - registers /v1/jobs on `api` before @serve.ingress reads its routes
from serving.playground.routes import playground_router  # noqa: E402

api.include_router(playground_router(authorize))  # the playground page at / and GET /v1/capabilities


@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict, models: dict[str, DeploymentHandle]):
        self.config = ServingConfig.model_validate(config)
        sec = self.config.security
        self.models = models
        self.keys = ApiKeys(sec.effective_api_keys())
        self.limiter = RateLimiter(sec.rate_limit.requests_per_minute, sec.rate_limit.burst) if sec.rate_limit \
            else None
        self.blocklist = Blocklist(sec.prompt_blocklist)
        self.timeout_s = self.config.ingress.request_timeout_s
        self.started = int(time.time())
        self.jobs = None
        if self.config.jobs is not None:
            from serving.jobs.runner import make_jobs

            self.jobs = make_jobs(self.config.jobs, models, self.config.default_model)
        api.state.ingress = self
        api.state.jobs = self.jobs
        api.state.max_body_bytes = sec.max_body_bytes
        log.info("ingress ready: models=%s auth=%s rate_limit=%s", list(models), self.keys.enabled,
                 bool(self.limiter))

    # ------------------------------------------------------------------ shared
    def check_request(self, req: GenerationRequest, openai: bool) -> str:
        """Model name (default filled) after the blocklist and unknown-model checks."""
        name = req.model or self.config.default_model
        if name not in self.models:
            known = ", ".join(self.models)
            msg = f"unknown model {name!r}; known models: {known}"
            if openai:
                raise OpenAIError(404, msg, "model", "model_not_found")
            raise ApiError(422, validation_detail("model", msg))
        term = self.blocklist.match(req.prompt, req.negative_prompt)
        if term is not None:
            msg = "prompt contains a blocked term"
            if openai:
                raise OpenAIError(400, msg, "prompt", "content_policy_violation")
            raise ApiError(400, {"message": msg, "field": "prompt", "code": "content_policy_violation"})
        return name

    async def call_model(self, name: str, req: GenerationRequest, openai: bool) -> GenerationResult:
        """Run one request on a model deployment; map failures to HTTP errors of the route's flavour."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        response = self.models[name].generate_outcome.remote(req)
        try:
            outcome = await asyncio.wait_for(response, self.timeout_s)
        except BackPressureError as err:
            wait = err.retry_after_s or 1.0
            raise self._error(openai, 503, f"model {name} is overloaded (queue full); retry later", None,
                              "overloaded", {"Retry-After": retry_after_header(wait)}) from None
        except asyncio.TimeoutError:
            response.cancel()
            raise self._error(openai, 504, f"generation took longer than {self.timeout_s:.0f}s", None,
                              "timeout") from None
        except (RayActorError, DeploymentUnavailableError) as err:
            log.warning("model %s unavailable: %s", name, type(err).__name__)
            raise self._error(openai, 503, f"model {name} is unavailable; retry later", None, "unavailable",
                              {"Retry-After": "5"}) from None
        if isinstance(outcome, GenerationError):
            raise self.generation_error(outcome, openai)
        return outcome

    @staticmethod
    def _error(openai: bool, status: int, message: str, field: str | None, code: str,
               headers: dict[str, str] | None = None) -> Exception:
        if openai:
            return OpenAIError(status, message, field, code, _OPENAI_TYPES.get(status, "invalid_request_error"),
                               headers)
        if status == 422:
            # "capacity_error": the request is valid but cannot fit this replica's VRAM budget
            return ApiError(422, validation_detail(field, message, "capacity_error" if code == "capacity"
                                                   else "value_error"), headers)
        return ApiError(status, {"message": message, "field": field, "code": code}, headers)

    def generation_error(self, err: GenerationError, openai: bool) -> Exception:
        if err.kind in ("validation", "capacity"):
            field = OPENAI_PARAM.get(err.field, err.field) if openai else err.field
            return self._error(openai, 400 if openai else 422, err.message, field, err.kind)
        if err.kind == "oom":
            return self._error(openai, 503, err.message, None, "oom", {"Retry-After": "2"})
        if err.kind == "cancelled":
            return self._error(openai, 409, err.message, None, "cancelled")
        return self._error(openai, 500, err.message, None, "internal_error")

    # ------------------------------------------------------------------ native
    @api.post("/v1/generate", responses={200: {"content": {"image/png": {}, "application/json": {}}}},
              summary="Generate images (PNG/JPEG/WebP bytes for one image, JSON for several)")
    async def generate(self, body: GenerationRequest, request: Request, caller: str = Depends(authorize)):
        name = self.check_request(body, openai=False)
        result = await self.call_model(name, body, openai=False)
        wants_json = "application/json" in request.headers.get("accept", "")
        if len(result.images) == 1 and not wants_json:
            img = result.images[0]
            return Response(img.data, media_type=img.media_type, headers=image_headers(result))
        return JSONResponse(result_json(result))

    # ------------------------------------------------------------------ OpenAI
    @api.post("/v1/images/generations", summary="OpenAI Images API: create image")
    async def openai_generate(self, body: OpenAIImageRequest, request: Request, caller: str = Depends(authorize)):
        if body.response_format == "url":
            raise OpenAIError(400, "response_format 'url' needs a result store; use 'b64_json' (or async jobs: "
                              "POST /v1/jobs)", "response_format", "unsupported_value")
        req = to_generation_request(body)
        name = self.check_request(req, openai=True)
        if body.user:
            log.info("openai images request user=%s caller=%s", body.user[:64], caller)
        return images_response(await self.call_model(name, req, openai=True))

    @api.get("/v1/models", summary="Served models (OpenAI list shape)")
    async def list_models(self, caller: str = Depends(authorize)):
        models = [{"id": m.name, "family": m.engine.family, "default": i == 0,
                   "noise_model": m.engine.is_noise_model,
                   "limits": m.engine.limits.model_dump(), "defaults": m.engine.defaults.model_dump()}
                  for i, m in enumerate(self.config.models)]
        return models_response(models, self.started)

    # ------------------------------------------------------------------ health
    @api.get("/healthz", summary="Liveness: the ingress answers")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: every model deployment is loaded and healthy")
    async def readyz(self):
        from serving.builder import model_statuses

        status = await asyncio.to_thread(model_statuses, self.config)
        ready = all(s == "HEALTHY" for s in status.values())
        return JSONResponse({"ready": ready, "models": status}, 200 if ready else 503)

