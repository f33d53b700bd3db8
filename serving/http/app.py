"""The app factory: `create_app(ingress)` builds the FastAPI app of one ingress replica.

Called by the Ingress deployment's `__serve_build_asgi_app__` (Serve's late-bound ingress) after its constructor,
as vLLM's build_app() does: body-size middleware, error handlers, then one router per route group.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from serving.drain import DrainMiddleware
from serving.http import health, routes_a1111, routes_controlnets, routes_jobs, routes_native, routes_openai, \
    routes_playground
from serving.http.errors import install_error_handlers
from serving.http.openapi import install_openapi
from serving.http.uploads import body_limit_of
from serving.security import BodyLimitMiddleware

DESCRIPTION = ("Stable Diffusion / SDXL image generation on Ray Serve. Native API (/v1/generate), OpenAI Images "
               "API (/v1/images/generations), async jobs (/v1/jobs), AUTOMATIC1111-compatible API (/sdapi/v1).")


def create_app(ingress: Any) -> FastAPI:
    """`ingress`: the running deployment (config, models, keys, limiter, jobs, check_request, call_model)."""
    app = FastAPI(title="sdserve", version="0.1.0", description=DESCRIPTION)
    app.state.ingress = ingress
    app.state.jobs = ingress.jobs
    app.state.body_limit_of = body_limit_of(ingress.config)  # larger on the routes that take images
    app.add_middleware(BodyLimitMiddleware, limit_of=app.state.body_limit_of)
    app.add_middleware(DrainMiddleware, gate=ingress.gate)  # added last: outermost (serving/drain.py)
    install_error_handlers(app)
    for group in (routes_native, routes_openai, routes_jobs, routes_a1111, routes_controlnets, health,
                  routes_playground):
        app.include_router(group.router)
    install_openapi(app, ingress.config)  # status codes, content types and this deployment's limits
    return app
