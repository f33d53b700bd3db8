"""Request bodies that may carry images: the per-route body limit and the native routes' two body encodings.

Routes that take images (IMAGE_ROUTES) accept bodies up to `image_inputs.max_body_bytes` (32 MiB by default);
every other route keeps `security.max_body_bytes` (64 KiB), so a plain JSON route is never a way to make the
ingress buffer megabytes.

POST /v1/generate and POST /v1/jobs take the one GenerationRequest either as
- `application/json`: images as base64 strings, data: URLs, or URIs under `image_inputs.uri_allowlist`; or
- `multipart/form-data`: a part `request` holding the same JSON object (any field, images included), plus image
  files in parts named after the field they fill: `init_image`, `mask_image`, `control.<i>.image` (the i-th
  entry of the JSON's `control` list, which then leaves `image` out). A field given both ways, an unknown part, or
  a control file without its `control[i]` entry is a 422 naming the part.
"""
# No `from __future__ import annotations`: FastAPI resolves dependency signatures at route registration.
import json
import re
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from core.schemas import GenerationRequest

# (method, path suffix): the routes whose bodies may carry images. Matched on the path's end, so a route_prefix
# in front does not matter.
IMAGE_ROUTES = (("POST", "/v1/generate"), ("POST", "/v1/jobs"), ("POST", "/v1/images/edits"),
                ("POST", "/sdapi/v1/img2img"), ("POST", "/sdapi/v1/txt2img"))
FILE_FIELDS = ("init_image", "mask_image")
CONTROL_PART = re.compile(r"control\.(\d)\.image")
MAX_PARTS = 16


def takes_images(method: str, path: str) -> bool:
    path = path.rstrip("/")
    return any(method == m and path.endswith(p) for m, p in IMAGE_ROUTES)


def body_limit_of(config):
    """The BodyLimitMiddleware's limit function for a ServingConfig: (limit in bytes, the config key that sets it)."""
    small, large = config.security.max_body_bytes, max(config.image_inputs.max_body_bytes,
                                                        config.security.max_body_bytes)

    def limit_of(scope) -> tuple[int, str]:
        if takes_images(scope.get("method", ""), scope.get("path", "")):
            return large, "image_inputs.max_body_bytes"
        return small, "security.max_body_bytes"
    return limit_of


def _invalid(loc: tuple, message: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *loc), "msg": message, "type": kind}])


def _validation(err: ValidationError) -> RequestValidationError:
    """pydantic's errors in FastAPI's shape (loc starting with "body"); json_invalid keeps its own type."""
    return RequestValidationError([{**e, "loc": ("body", *e.get("loc", ()))} for e in err.errors(include_url=False)])


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def read_form(request: Request):
    """The multipart form, bounded: few parts, each up to the route's body limit (the middleware caps the sum)."""
    limit = request.app.state.body_limit_of(request.scope)[0]
    return await request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS, max_part_size=limit)


async def part_value(value: Any) -> Any:
    """A form part as the request field's value: an uploaded file's bytes, a text part's string."""
    return await value.read() if isinstance(value, UploadFile) else value


async def merge_multipart(request: Request) -> dict[str, Any]:
    """The request dict of a multipart body: the `request` JSON part with the file parts put in their fields."""
    form = await read_form(request)
    raw = form.get("request")
    if raw is None:
        raise _invalid(("request",), "multipart body needs a part `request` holding the JSON request (e.g. "
                                     "{\"prompt\": \"...\"}); images go in parts init_image, mask_image, "
                                     "control.<i>.image", "missing")
    if isinstance(raw, UploadFile):
        raw = await raw.read()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise _invalid(("request",), f"part `request` is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise _invalid(("request",), "part `request` must be a JSON object")
    for name in form.keys():
        if name == "request":
            continue
        values = form.getlist(name)
        if len(values) > 1:
            raise _invalid((name,), f"part {name!r} given {len(values)} times")
        value = await part_value(values[0])
        control = CONTROL_PART.fullmatch(name)
        if name in FILE_FIELDS:
            if data.get(name) is not None:
                raise _invalid((name,), f"{name} given twice (in `request` and as a part)")
            data[name] = value
        elif control is not None:
            i = int(control.group(1))
            entries = data.get("control")
            if not isinstance(entries, list) or i >= len(entries) or not isinstance(entries[i], dict):
                raise _invalid((name,), f"part {name!r} needs control[{i}] in `request` (its model, scale...)")
            if entries[i].get("image") is not None:
                raise _invalid((name,), f"{name} given twice (in `request` and as a part)")
            entries[i]["image"] = value
        else:
            raise _invalid((name,), f"unknown part {name!r}; parts: request, init_image, mask_image, "
                                    "control.<i>.image")
    return data


async def generation_body(request: Request) -> GenerationRequest:
    """The GenerationRequest of a native route, from a JSON or a multipart body (see the module docstring)."""
    try:
        if is_multipart(request):
            return GenerationRequest.model_validate(await merge_multipart(request))
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and not (content_type == "application/json" or content_type.endswith("+json")):
            # As FastAPI: never parse JSON out of text/plain (a cross-site form may send that without preflight).
            raise _invalid((), f"content type {content_type!r} is not accepted: send application/json or "
                               "multipart/form-data", "model_attributes_type")
        raw = await request.body()
        if not raw:
            raise _invalid((), "Field required", "missing")
        try:
            data = json.loads(raw)
        except ValueError as err:  # FastAPI's own json_invalid error (its handler says where: "at character 15")
            pos = getattr(err, "pos", 0)
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", pos), "msg": "JSON decode error",
                                           "input": {}, "ctx": {"error": getattr(err, "msg", str(err))}}]) from None
        return GenerationRequest.model_validate(data)
    except ValidationError as err:
        raise _validation(err) from None


MULTIPART_PART_SCHEMA = "GenerationRequestPart"  # the `request` part: GenerationRequest (see openapi_images.py)


def request_body_doc(schema_ref: str, description: str) -> dict[str, Any]:
    """openapi_extra of a route parsed by `generation_body`: the same schema as JSON or as multipart.

    The multipart schema states the common case (files init_image and mask_image beside the JSON part); parts
    control.<i>.image are accepted too (see the description)."""
    ref = {"$ref": f"#/components/schemas/{schema_ref}"}
    binary = {"type": "string", "format": "binary"}
    return {"requestBody": {"required": True, "description": description, "content": {
        "application/json": {"schema": ref},
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["request"], "additionalProperties": False,
                       "dependentRequired": {"mask_image": ["init_image"]}, "properties": {
                           "request": {"$ref": f"#/components/schemas/{MULTIPART_PART_SCHEMA}"},
                           "init_image": binary, "mask_image": binary}},
            "encoding": {"request": {"contentType": "application/json"}}}}}}
