"""A truthful /openapi.json: every status code a route answers, every content type it returns, and the limits of
THIS deployment (body size, each model's width/height/steps/images/prompt limits, known models and schedulers).

FastAPI derives the document from the routes and the request models, which know neither the serving config's
limits nor the errors raised by middleware, dependencies and handlers (413, 401, 429, 503, ...). `install_openapi`
wraps `app.openapi()` once per app and adds them, so a schema fuzzer (tests/serving/test_openapi_contract.py runs
schemathesis) finds no schema-valid request that the server refuses and no undocumented answer.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from core.schedulers import SCHEDULERS
from serving.config import ServingConfig

JSON = {"application/json": {"schema": {"type": "object"}}}
IMAGES = {t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/png", "image/jpeg", "image/webp")}
SSE = {"text/event-stream": {"schema": {"type": "string"}}}


def _error(text: str, headers: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"description": text, "content": JSON}
    if headers:
        out["headers"] = {h: {"schema": {"type": "string"}} for h in headers}
    return out


def error_responses(config: ServingConfig) -> dict[str, dict[str, Any]]:
    body, image_body = config.security.max_body_bytes, config.image_inputs.max_body_bytes
    return {
        "400": _error("Blocked prompt (security.prompt_blocklist); on OpenAI routes any invalid request, OpenAI's "
                      "{\"error\": {...}} shape naming the `param`."),
        "401": _error("Missing or wrong `Authorization: Bearer <key>` (only when API keys are configured).",
                      ("WWW-Authenticate",)),
        "404": _error("Unknown model (OpenAI routes, GET /v1/loras?model=), unknown job id, or jobs not enabled."),
        "409": _error("Job result asked for before the job succeeded, or a cancelled generation."),
        "410": _error("Job result expired (jobs.retention_s)."),
        "413": _error(f"Request body over {body} bytes (security.max_body_bytes); on the routes that take "
                      f"images, over {max(body, image_body)} bytes (image_inputs.max_body_bytes)."),
        "422": _error("A field outside the schema or outside the model's limits (width/height/pixels/steps/"
                      "images/prompt length), or a request that cannot fit the replica's memory budget; "
                      "`detail[].loc` names the field."),
        "429": _error("Rate limit exceeded (security.rate_limit).", ("Retry-After",)),
        "500": _error("The model failed on this request (e.g. a CUDA error; the replica is then replaced)."),
        "503": _error("Model queue full (backpressure), out of GPU memory, or a model replica unavailable.",
                      ("Retry-After",)),
        "504": _error("Generation took longer than ingress.request_timeout_s."),
    }


# Which documented errors each operation can answer, by (method, path without the route prefix).
AUTH = ("401", "429")
GENERATE = AUTH + ("413", "422", "400", "409", "500", "503", "504")
ROUTE_ERRORS = {
    ("post", "/v1/generate"): GENERATE,
    ("post", "/v1/images/generations"): AUTH + ("400", "404", "413", "409", "500", "503", "504"),
    ("post", "/v1/images/edits"): AUTH + ("400", "404", "413", "409", "500", "503", "504"),
    ("post", "/sdapi/v1/txt2img"): AUTH + ("413", "422", "409", "500", "503", "504"),
    ("post", "/sdapi/v1/img2img"): AUTH + ("413", "422", "409", "500", "503", "504"),
    ("post", "/sdapi/v1/options"): AUTH + ("422",),
    ("get", "/v1/models"): AUTH,
    ("get", "/v1/loras"): AUTH + ("404",),
    ("get", "/v1/controlnets"): AUTH,
    ("get", "/controlnet/model_list"): AUTH,
    ("get", "/controlnet/module_list"): AUTH,
    ("get", "/controlnet/version"): AUTH,
    ("post", "/v1/jobs"): AUTH + ("400", "404", "413", "422"),
    ("get", "/v1/jobs/{job_id}"): AUTH + ("404",),
    ("get", "/v1/jobs/{job_id}/result"): AUTH + ("404", "409", "410"),
    ("delete", "/v1/jobs/{job_id}"): AUTH + ("404",),
    ("get", "/v1/jobs/{job_id}/events"): AUTH + ("404",),
    ("get", "/readyz"): ("503",),
}
# Success bodies other than JSON.
SUCCESS_CONTENT = {
    ("post", "/v1/generate"): {**IMAGES, **JSON},
    ("get", "/v1/jobs/{job_id}/result"): {**IMAGES, **JSON},
    ("get", "/v1/jobs/{job_id}/events"): SSE,
}


def _largest(config: ServingConfig, key: str) -> int:
    return max(getattr(m.engine.limits, key) for m in config.models)


def request_limits(config: ServingConfig) -> dict[str, dict[str, Any]]:
    """JSON-schema keywords per GenerationRequest property: the largest limit any served model accepts."""
    pixels = _largest(config, "max_pixels")
    size_note = (f" This deployment: width x height <= {pixels} pixels; per model: " + "; ".join(
        f"{m.name} <= {m.engine.limits.max_width}x{m.engine.limits.max_height}, {m.engine.limits.max_pixels} px, "
        f"{m.engine.limits.max_steps} steps, {m.engine.limits.max_images_per_request} images"
        for m in config.models) + ".")
    return {
        "prompt": {"maxLength": _largest(config, "max_prompt_chars"), "pattern": r"\S"},
        "width": {"maximum": _largest(config, "max_width"), "description_add": size_note},
        "height": {"maximum": _largest(config, "max_height"), "description_add": size_note},
        "steps": {"maximum": _largest(config, "max_steps")},
        "num_images": {"maximum": _largest(config, "max_images_per_request")},
        "scheduler": {"enum": sorted(SCHEDULERS)},
        "model": {"enum": config.model_names},
        "loras": lora_limits(config),
    }


def lora_limits(config: ServingConfig) -> dict[str, Any]:
    with_library = [m for m in config.models if m.engine.loras is not None]
    if not with_library:
        return {"maxItems": 0, "description_add": " No model of this deployment has a LoRA library: must be empty."}
    return {"maxItems": max(m.engine.loras.max_loras for m in with_library),
            "description_add": " Models with a LoRA library: " + ", ".join(m.name for m in with_library)
            + "; names: GET /v1/loras (an unknown name or another base family's LoRA gets 422)."}


MAX_SIZE_ENUM = 1024  # list every accepted 'WxH' when there are at most this many, else a pattern + description


def size_limits(config: ServingConfig) -> dict[str, Any]:
    """The OpenAI `size` values this deployment accepts: 'auto' or 'WxH' in multiples of 8 within the default
    model's limits. Listed exactly when few enough (a JSON-schema pattern cannot say "multiple of 8, <= N")."""
    lim = config.models[0].engine.limits
    widths, heights = range(64, lim.max_width + 1, 8), range(64, lim.max_height + 1, 8)
    text = (f" Accepted: 'auto' or 'WxH', multiples of 8, 64 <= W <= {lim.max_width}, 64 <= H <= "
            f"{lim.max_height}, W x H <= {lim.max_pixels} (the model's limits); other sizes get 400.")
    if len(widths) * len(heights) <= MAX_SIZE_ENUM:
        sizes = ["auto"] + [f"{w}x{h}" for w in widths for h in heights if w * h <= lim.max_pixels]
        return {"enum": sizes, "description_add": text}
    return {"pattern": r"^(auto|[0-9]{2,4}x[0-9]{2,4})$", "description_add": text}


def _narrow(prop: dict[str, Any], limits: dict[str, Any]) -> None:
    """Apply limits to a property (which may be `anyOf: [{type}, {type: null}]` for optional fields)."""
    limits = dict(limits)
    add = limits.pop("description_add", None)
    if add:
        prop["description"] = (prop.get("description", "") + add).strip()
    targets = [s for s in prop.get("anyOf", []) if s.get("type") not in (None, "null")] or [prop]
    for target in targets:
        for key, value in limits.items():
            current = target.get(key)
            if key in ("maximum", "maxLength") and current is not None:
                value = min(current, value)
            target[key] = value
        if "enum" in target:
            target.pop("maxLength", None)


def add_component(schema: dict[str, Any], model) -> None:
    """A pydantic model (and the models it uses) in components/schemas: the routes that parse their body
    themselves (JSON or multipart, serving/http/uploads.py) refer to it from openapi_extra, which FastAPI does not
    follow."""
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    if model.__name__ in comps:
        return
    js = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in js.pop("$defs", {}).items():
        comps.setdefault(name, sub)
    comps[model.__name__] = js


def describe(schema: dict[str, Any], config: ServingConfig) -> dict[str, Any]:
    """The document FastAPI generated, made true for `config` (modified in place and returned)."""
    from core.schemas import GenerationRequest

    add_component(schema, GenerationRequest)
    props = schema.get("components", {}).get("schemas", {}).get("GenerationRequest", {}).get("properties", {})
    for name, limits in request_limits(config).items():
        if name in props:
            _narrow(props[name], limits)
    oa = schema.get("components", {}).get("schemas", {}).get("OpenAIImageRequest", {}).get("properties", {})
    limits = request_limits(config)
    for name, key in (("prompt", "prompt"), ("steps", "steps"), ("n", "num_images"), ("scheduler", "scheduler"),
                      ("model", "model"), ("loras", "loras")):
        if name in oa:
            _narrow(oa[name], limits[key])
    if "size" in oa:
        _narrow(oa["size"], size_limits(config))
    from serving.http.openapi_images import describe_a1111, describe_edits, describe_generation_images

    describe_generation_images(schema, config)
    describe_a1111(schema, config)
    describe_edits(schema, config, size_limits(config), limits)
    if "response_format" in oa:  # 'url' is in OpenAI's API but always answered 400 here (no result store)
        _narrow(oa["response_format"], {"enum": ["b64_json"], "description_add": " 'url' gets 400 (no result "
                                        "store; use b64_json or POST /v1/jobs)."})
    errors = error_responses(config)
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            key = (method, path)
            responses = op.setdefault("responses", {})
            if key in SUCCESS_CONTENT:
                for code, resp in responses.items():
                    if code.startswith("2"):
                        resp["content"] = SUCCESS_CONTENT[key]
            for code in ROUTE_ERRORS.get(key, ()):
                responses.setdefault(code, errors[code])
            if "422" in responses and "422" not in ROUTE_ERRORS.get(key, ("422",)):
                responses["422"] = errors["422"]  # FastAPI's own: keep, with the real meaning
    info = schema.setdefault("info", {})
    info["description"] = (info.get("description", "") + f" Request bodies over "
                           f"{config.security.max_body_bytes} bytes get 413 ({config.image_inputs.max_body_bytes} "
                           "on the routes that take images). Models: "
                           + ", ".join(config.model_names) + ".").strip()
    return schema


def install_openapi(app: FastAPI, config: ServingConfig) -> None:
    """Replace app.openapi with the described document (built once, cached like FastAPI's own)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe(generate(), config)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
