"""Draining the HTTP ingress before a stop: nothing accepted is lost.

A drain (1) stops accepting: new requests get 503 + Retry-After in the API's error shape, /readyz says not ready;
(2) lets the requests in flight finish, up to `ingress.drain_timeout_s`; (3) queues the running async jobs again
(serving/jobs/runner.py `JobWorker.drain`); then the caller stops Serve. `sdserve serve` drains on SIGTERM/SIGINT
(`drain_app`); under `serve deploy` / KubeRay, Serve's own replica shutdown does (1)-(2) with the ingress's
`graceful_shutdown_timeout_s` (= drain_timeout_s) and the ingress's `__del__` does (3). docs/deploy.md#draining.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

log = logging.getLogger("ray.serve")
OPENAI_PATHS = ("/v1/images/", "/v1/models")
ALWAYS_OPEN = ("/healthz", "/readyz")  # probes answer during a drain (readyz: not ready)


class DrainGate:
    """Counts the HTTP requests in flight and, once draining, turns new ones away. One per ingress replica."""

    def __init__(self, retry_after_s: float = 5.0):
        self.draining = False
        self.retry_after_s = retry_after_s
        self.inflight = 0
        self._idle: asyncio.Event | None = None
        self.drained: asyncio.Future | None = None

    def _idle_event(self) -> asyncio.Event:
        if self._idle is None:  # made on the replica's event loop
            self._idle = asyncio.Event()
            self._idle.set()
        return self._idle

    def enter(self) -> None:
        self.inflight += 1
        self._idle_event().clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle_event().set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True when every request in flight finished within timeout_s."""
        try:
            await asyncio.wait_for(self._idle_event().wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


class DrainMiddleware:
    """Pure ASGI middleware, outermost: the gate sees every request before anything parses it."""

    def __init__(self, app, gate: DrainGate):
        self.app, self.gate = app, gate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.gate.draining and not any(path.endswith(p) for p in ALWAYS_OPEN):
            return await _send_503(send, path, self.gate.retry_after_s)
        self.gate.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.leave()


async def _send_503(send, path: str, retry_after_s: float) -> None:
    message = "the server is shutting down (draining); retry on another replica or shortly"
    if any(p in path for p in OPENAI_PATHS):
        payload = {"error": {"message": message, "type": "server_error", "param": None, "code": "draining"}}
    else:
        payload = {"detail": {"message": message, "field": None, "code": "draining"}}
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(max(1, round(retry_after_s))).encode())]})
    await send({"type": "http.response.body", "body": body})


async def drain_ingress(ingress, timeout_s: float) -> dict:
    """Drain one ingress replica (idempotent: a second call waits for the first). Returns what happened."""
    gate: DrainGate = ingress.gate
    if gate.drained is None:
        gate.drained = asyncio.get_running_loop().create_future()
        gate.draining = True
        start = time.monotonic()
        log.info("drain: stopped accepting; %d request(s) in flight", gate.inflight)
        finished = await gate.wait_idle(timeout_s)
        requeued = await ingress.jobs.drain() if ingress.jobs is not None else []
        summary = {"replica": _replica_id(), "in_flight_finished": finished, "left_in_flight": gate.inflight,
                   "jobs_requeued": len(requeued), "seconds": round(time.monotonic() - start, 3)}
        log.info("drain: done %s", summary)
        gate.drained.set_result(summary)
    return await asyncio.shield(gate.drained)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (tests)
        return "local"


def drain_app(config, timeout_s: float | None = None) -> list[dict]:
    """From the process that runs Serve (`sdserve serve` on SIGTERM): drain every ingress replica of the app
    through its handle, before Serve is shut down. Serve routes each call to one replica; calls are repeated
    until every replica reported (a drained replica answers at once)."""
    from ray import serve

    timeout_s = config.ingress.drain_timeout_s if timeout_s is None else timeout_s
    handle = serve.get_deployment_handle("ingress", app_name=config.app_name)
    want, seen = config.ingress.num_replicas, {}
    deadline = time.monotonic() + timeout_s + 30
    while len(seen) < want and time.monotonic() < deadline:
        calls = [handle.drain.remote(timeout_s) for _ in range(want - len(seen))]
        for call in calls:
            try:
                summary = call.result(timeout_s=max(1.0, deadline - time.monotonic()))
            except Exception as err:  # noqa: BLE001 - a replica that died has nothing left to drain
                log.warning("drain: %s", err)
                continue
            seen[summary["replica"]] = summary
    return list(seen.values())
