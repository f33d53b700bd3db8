"""The HTTP ingress deployment: per-replica state (config, model handles, keys, limiter, blocklist, jobs) and the
two steps every generation route shares (check the request, call the model). Its FastAPI app is built after the
constructor by serving/http/app.py (Serve's late-bound `__serve_build_asgi_app__`); the routes live there.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable

from ray import serve
from ray.serve.handle import DeploymentHandle

from core.schemas import GenerationError, GenerationRequest, GenerationResult
from serving.config import ServingConfig
from serving.http.app import create_app
from serving.http.errors import ApiError, generation_error, route_error, validation_detail
from serving.openai_api import OpenAIError
from serving.drain import DrainGate, drain_ingress
from serving.lora_routing import routed
from serving.security import ApiKeys, Blocklist, FailureThrottle, RateLimiter, retry_after_header

log = logging.getLogger("ray.serve")


@serve.ingress()
class Ingress:
    def __init__(self, config: ServingConfig, models: dict[str, DeploymentHandle]):
        self.config = config
        sec = config.security
        self.models = models
        self.keys = ApiKeys(sec.effective_api_keys())
        self.limiter = RateLimiter(sec.rate_limit.requests_per_minute, sec.rate_limit.burst) if sec.rate_limit \
            else None
        # Reads (GET: job polling, results, models) draw from a budget of their own.
        self.read_limiter = RateLimiter(sec.rate_limit.reads_per_minute, sec.rate_limit.read_burst) \
            if sec.rate_limit else None
        self.auth_throttle = FailureThrottle(sec.auth_failures.max_failures, sec.auth_failures.window_s)
        self.gate = DrainGate()
        self.metrics = None
        self.blocklist = Blocklist(sec.prompt_blocklist)
        self.timeout_s = config.ingress.request_timeout_s
        self.started = int(time.time())
        self.jobs = None
        if config.jobs is not None:
            from serving.jobs.runner import make_jobs

            self.jobs = make_jobs(config.jobs, models, config.default_model)
        log.info("ingress ready: models=%s auth=%s rate_limit=%s", list(models), self.keys.enabled,
                 bool(self.limiter))

    def __serve_build_asgi_app__(self):
        return create_app(self)

    async def drain(self, timeout_s: float | None = None) -> dict:
        """Stop accepting (503 + Retry-After), let requests in flight finish (<= timeout_s), queue running jobs
        again. Called through the handle by `sdserve serve` on SIGTERM (serving/drain.py)."""
        return await drain_ingress(self, self.config.ingress.drain_timeout_s if timeout_s is None else timeout_s)

    async def __del__(self):
        # Serve calls this after the replica's graceful shutdown waited for its requests (serve deploy, KubeRay,
        # a redeploy): running jobs are queued again for the next replica instead of being lost mid-run.
        if hasattr(self, "gate"):
            await drain_ingress(self, 0)

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
        response = routed(self.models[name], req).generate_outcome.remote(req)  # to replicas holding its LoRAs
        finished = False
        try:
            with self._transport_errors(name, openai):
                outcome = await asyncio.wait_for(response, self.timeout_s)
            finished = True
        finally:
            # Timeout, or this HTTP request cancelled (client gone): cancelling the awaiting task alone does not
            # cancel the model call (DeploymentResponse.__await__ only re-raises; Ray's recursive ray.cancel from
            # the proxy covers the proxy path only), so cancel it explicitly: the model replica's asyncio task is
            # cancelled and the engine drops the request at its next step.
            if not finished:
                _cancel_call(response)
        if isinstance(outcome, GenerationError):
            raise generation_error(outcome, openai)
        return outcome

    async def stream_model(self, name: str, req: GenerationRequest, on_progress: Callable[[int, int], None],
                           on_preview: Callable[[int, int, list[str]], None] | None = None
                           ) -> GenerationResult | GenerationError:
        """Run one request through the model's generate_stream, calling on_progress(step, total) after each
        denoising step and on_preview(step, total, [base64 JPEG per image]) on each live preview; returns the
        outcome (a GenerationError is returned, not raised). Transport failures map like call_model's (native
        flavour). Cancelling the awaiting task cancels the request in the engine."""
        stream = routed(self.models[name], req).options(stream=True).generate_stream.remote(req)
        outcome, finished = None, False
        try:
            with self._transport_errors(name, openai=False):
                async with asyncio.timeout(self.timeout_s):
                    async for event in stream:
                        if event["event"] == "progress":
                            on_progress(event["step"], event["total"])
                        elif event["event"] == "preview":
                            if on_preview is not None:
                                on_preview(event["step"], event["total"], event["images"])
                        else:
                            outcome = event["outcome"]
            finished = True
        finally:
            if not finished:  # timeout, cancellation (interrupt, client gone), error: stop it in the engine
                _cancel_call(stream)
        if outcome is None:
            raise route_error(False, 500, f"model {name} ended the stream without a result", None, "internal_error")
        return outcome

    @contextlib.contextmanager
    def _transport_errors(self, name: str, openai: bool):
        """A model call's transport failures as HTTP errors of the route's flavour: queue full 503 + Retry-After,
        timeout 504, replica gone 503."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            yield
        except BackPressureError as err:
            raise route_error(openai, 503, f"model {name} is overloaded (queue full); retry later", None,
                              "overloaded", {"Retry-After": retry_after_header(err.retry_after_s or 1.0)}) from None
        except TimeoutError:  # asyncio.wait_for's and asyncio.timeout's (one class since Python 3.11)
            raise route_error(openai, 504, f"generation took longer than {self.timeout_s:.0f}s", None,
                              "timeout") from None
        except (RayActorError, DeploymentUnavailableError) as err:
            log.warning("model %s unavailable: %s", name, type(err).__name__)
            raise route_error(openai, 503, f"model {name} is unavailable; retry later", None, "unavailable",
                              {"Retry-After": "5"}) from None

def _cancel_call(response) -> None:
    """Cancel a model call (DeploymentResponse or DeploymentResponseGenerator) its caller gave up on. One that
    already failed (e.g. BackPressureError at assignment) has nothing left to cancel, and its cancel() re-raises
    that failure (handle.py _fetch_future_result_sync), which must not replace the route's own error."""
    try:
        response.cancel()
    except Exception:  # noqa: BLE001 - the call failed before it ran: nothing runs that could be stopped
        pass
