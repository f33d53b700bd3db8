"""Error shapes of the HTTP API: native routes answer {"detail": ...} (FastAPI's, 422 field-level), OpenAI routes
(/v1/images/*, /v1/models) answer OpenAI's {"error": {...}} with 400/401/404/429/503.

`install_error_handlers` registers the handlers on an app; `route_error` / `generation_error` build the exception
a route raises, in its own flavour.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from core.schemas import GenerationError
from serving.openai_api import OPENAI_PARAM, OpenAIError

OPENAI_PREFIXES = ("/v1/images/", "/v1/models")
OPENAI_TYPES = {401: "authentication_error", 429: "rate_limit_exceeded", 503: "server_error", 500: "server_error",
                504: "server_error"}


class ApiError(Exception):
    """An error on a native route: rendered as {"detail": ...} with status and headers."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def is_openai(request: Request) -> bool:
    # Substring, not prefix: under a route_prefix the path may carry it.
    return any(p in request.url.path for p in OPENAI_PREFIXES)


def validation_detail(field: str | None, message: str, kind: str = "value_error") -> list[dict]:
    return [{"loc": ["body", field] if field else ["body"], "msg": message, "type": kind}]


def route_error(openai: bool, status: int, message: str, field: str | None, code: str,
                headers: dict[str, str] | None = None) -> Exception:
    """The exception a route raises for this failure, in the route's flavour (OpenAI or native)."""
    if openai:
        return OpenAIError(status, message, field, code, OPENAI_TYPES.get(status, "invalid_request_error"), headers)
    if status == 422:
        # "capacity_error": the request is valid but cannot fit this replica's VRAM budget
        return ApiError(422, validation_detail(field, message, "capacity_error" if code == "capacity"
                                               else "value_error"), headers)
    return ApiError(status, {"message": message, "field": field, "code": code}, headers)


def generation_error(err: GenerationError, openai: bool) -> Exception:
    """A model replica's GenerationError as the HTTP error of the route's flavour."""
    if err.kind in ("validation", "capacity"):
        field = OPENAI_PARAM.get(err.field, err.field) if openai else err.field
        return route_error(openai, 400 if openai else 422, err.message, field, err.kind)
    if err.kind == "oom":
        return route_error(openai, 503, err.message, None, "oom", {"Retry-After": "2"})
    if err.kind == "cancelled":
        return route_error(openai, 409, err.message, None, "cancelled")
    return route_error(openai, 500, err.message, None, "internal_error")


async def _api_error(request: Request, exc: ApiError):
    if is_openai(request):  # the shared checks (auth, rate limit) raise ApiError on OpenAI routes too
        d = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        err = OpenAIError(exc.status, d.get("message", ""), d.get("field"), d.get("code"),
                          OPENAI_TYPES.get(exc.status, "invalid_request_error"))
        return JSONResponse(err.body(), exc.status, headers=exc.headers)
    return JSONResponse({"detail": exc.detail}, exc.status, headers=exc.headers)


async def _openai_error(request: Request, exc: OpenAIError):
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    if is_openai(request):
        e = errors[0] if errors else {}
        loc = [p for p in e.get("loc", ()) if p != "body"]
        param = str(loc[0]) if loc else None
        msg = f"{param}: {e.get('msg')}" if param else str(e.get("msg", "invalid request body"))
        return JSONResponse(OpenAIError(400, msg, OPENAI_PARAM.get(param, param), "invalid_value").body(), 400)
    clean = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
    return JSONResponse({"detail": clean}, 422)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
