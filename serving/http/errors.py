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

from core.schemas import ErrorKind, GenerationError
from serving.metrics import count_error
from serving.openai_api import OPENAI_PARAM, OpenAIError, invalid_json_message, openai_message

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


def field_loc(field: str | None) -> list:
    """A field name as a FastAPI loc: "control.0.image" -> ["body", "control", 0, "image"]."""
    if not field:
        return ["body"]
    return ["body", *(int(p) if p.isdigit() else p for p in field.split("."))]


def validation_detail(field: str | None, message: str, kind: str = "value_error") -> list[dict]:
    return [{"loc": field_loc(field), "msg": message, "type": kind}]


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
    if err.kind in (ErrorKind.VALIDATION, ErrorKind.CAPACITY):
        if openai:  # OpenAI's names: `n`, not num_images; `size`, not width
            return route_error(True, 400, openai_message(err.message, err.field),
                               OPENAI_PARAM.get(err.field, err.field), err.kind.value)
        return route_error(False, 422, err.message, err.field, err.kind.value)
    if err.kind == ErrorKind.OOM:
        return route_error(openai, 503, err.message, None, "oom", {"Retry-After": "2"})
    if err.kind == ErrorKind.CANCELLED:
        return route_error(openai, 409, err.message, None, "cancelled")
    return route_error(openai, 500, err.message, None, "internal_error")


def _count(request: Request, status: int, code: str | None) -> None:
    """sdserve_errors_total for what the model replicas never see: 503s, 504s, cancellations."""
    if status in (503, 504) or code == "cancelled":
        count_error(code or str(status), getattr(request.state, "model", None))


async def _api_error(request: Request, exc: ApiError):
    _count(request, exc.status, exc.detail.get("code") if isinstance(exc.detail, dict) else None)
    if is_openai(request):  # the shared checks (auth, rate limit) raise ApiError on OpenAI routes too
        d = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        err = OpenAIError(exc.status, d.get("message", ""), d.get("field"), d.get("code"),
                          OPENAI_TYPES.get(exc.status, "invalid_request_error"))
        return JSONResponse(err.body(), exc.status, headers=exc.headers)
    return JSONResponse({"detail": exc.detail}, exc.status, headers=exc.headers)


async def _openai_error(request: Request, exc: OpenAIError):
    _count(request, exc.status, exc.code)
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:  # its loc is a character offset, not a field: say what is wrong instead
        message = invalid_json_message(bad_json)
        if is_openai(request):
            return JSONResponse(OpenAIError(400, message, None, "invalid_json").body(), 400)
        return JSONResponse({"detail": {"message": message, "field": None, "code": "invalid_json"}}, 400)
    if is_openai(request):
        e = errors[0] if errors else {}
        loc = [p for p in e.get("loc", ()) if p != "body"]
        param = str(loc[0]) if loc else None
        msg = f"{param}: {e.get('msg')}" if param else str(e.get("msg", "invalid request body"))
        return JSONResponse(OpenAIError(400, msg, OPENAI_PARAM.get(param, param), "invalid_value").body(), 400)
    clean = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
    return JSONResponse({"detail": clean}, 422)


async def _store_unavailable(request: Request, exc: Exception):
    """The jobs store (Redis, or the SQLite file) cannot be reached: 503 + Retry-After, never a bare 500."""
    import logging

    logging.getLogger("ray.serve").warning("jobs store unavailable: %s: %s", type(exc).__name__, exc)
    return await _api_error(request, ApiError(503, {"message": "the jobs store is unavailable; retry later",
                                                    "field": None, "code": "jobs_store_unavailable"},
                                              {"Retry-After": "5"}))


def install_error_handlers(app: FastAPI) -> None:
    from serving.jobs.store import STORE_ERRORS

    for error in STORE_ERRORS:
        app.add_exception_handler(error, _store_unavailable)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
