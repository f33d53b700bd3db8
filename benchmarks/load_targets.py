"""Where the open-loop load benchmark (benchmarks/load.py) sends requests: an engine in this process, or a running
server over HTTP. Both answer `await send(body) -> outcome` from one asyncio loop.

An outcome: {"outcome": "ok" | an error kind, "batch_size", "queue_s", "model", "message"}. Error kinds: the
engine's (validation, capacity, oom, cancelled, internal) in-process; over HTTP those of
benchmarks.replica_load.classify (capacity, backpressure, oom, error_5xx, error_4xx, transport).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import re
from typing import Any

from benchmarks.replica_load import classify


def find_count(info: Any, part: str = "recompile") -> int | None:
    """The first integer under a key containing `part`, anywhere in a nested info dict (None: not reported)."""
    if isinstance(info, dict):
        for key, value in info.items():
            if part in str(key).lower() and isinstance(value, int) and not isinstance(value, bool):
                return value
        for value in info.values():
            found = find_count(value, part)
            if found is not None:
                return found
    return None


def set_admission(config, admission: str):
    """A copy of the engine config with `scheduling.admission` set; ValueError when this engine has no such
    setting (the request-level engine before issue 18)."""
    if "scheduling" not in type(config).model_fields:
        raise ValueError(f"--admission {admission}: this engine's config has no scheduling.admission; run with "
                         "--admission default")
    data = config.model_dump()
    data["scheduling"] = {**(data.get("scheduling") or {}), "admission": admission}
    return type(config).model_validate(data)  # an unknown admission value fails here, naming the field


def admission_of(config) -> str | None:
    value = getattr(getattr(config, "scheduling", None), "admission", None)
    return getattr(value, "value", value)  # an Enum's value, as the config's YAML spells it


class EngineTarget:
    """core.engine.Engine in this process. With `generate_async` (the step-level engine) every request is one
    coroutine on the benchmark's loop; without it, one thread per request calls `engine.generate([request])`."""

    kind = "in-process"

    def __init__(self, engine, max_threads: int = 512):
        self.engine = engine
        self.engine_api = "generate_async" if inspect.iscoroutinefunction(
            getattr(engine, "generate_async", None)) else "threads"
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="load") \
            if self.engine_api == "threads" else None
        self._inflight: set[concurrent.futures.Future] = set()

    async def send(self, body: dict) -> dict[str, Any]:
        from core.schemas import GenerationError, GenerationRequest

        request = GenerationRequest(**body)
        try:
            if self._pool is None:
                out = await self.engine.generate_async(request)
            else:
                fut = self._pool.submit(self.engine.generate, [request])
                self._inflight.add(fut)
                fut.add_done_callback(self._inflight.discard)
                out = (await asyncio.wrap_future(fut))[0]
        except GenerationError as err:
            out = err
        if isinstance(out, GenerationError):
            return {"outcome": str(out.kind or "internal"), "message": out.message[:300]}  # ErrorKind's value
        # generate([request]) from a thread: the engine cannot tell its wait for the GPU from its work (queue_s 0)
        queue_s = out.timings.queue_s if self._pool is None else None
        return {"outcome": "ok", "batch_size": out.batch_size, "queue_s": queue_s, "model": out.model}

    async def settle(self, timeout_s: float) -> int:
        """Wait for requests given up on (drain timeout) that threads still run: the next run starts on an idle
        engine. Returns how many were still running after timeout_s."""
        pending = list(self._inflight)
        if pending:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: concurrent.futures.wait(pending, timeout=timeout_s))
        return sum(1 for f in pending if not f.done())

    def recompiles(self) -> int | None:
        return find_count(self.engine.info())

    def describe(self) -> dict[str, Any]:
        info = self.engine.info()
        cfg = self.engine.config
        return {"target": self.kind, "engine_api": self.engine_api, "model": cfg.name, "model_source": cfg.source,
                "admission": admission_of(cfg), "max_batch_size": cfg.limits.max_batch_size, "engine": info}

    def switch_admission(self, admission: str) -> None:
        """Serve the next pass under another `scheduling.admission` with the same loaded (compiled) engine: the
        step scheduler reads the value at every admission, so between passes (nothing in flight) the switch is
        exact, and both admissions run the same compiled graphs without paying warm-up twice."""
        self.engine.config = set_admission(self.engine.config, admission)
        self.engine.scheduler.cfg = self.engine.config.scheduling

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


_QUEUE_TIMING = re.compile(r"(?:^|,)\s*queue;dur=([0-9.]+)")


class HttpTarget:
    """POST {url}/v1/generate of a running server. One-image answers come as image bytes: the batch size is read
    from X-Batch-Size and the queue time from Server-Timing; JSON answers carry both."""

    kind = "http"
    engine_api = "http"

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0, model: str | None = None,
                 max_connections: int = 1024, admission: str | None = None, transport=None):
        import httpx

        self.url, self.model, self.admission = url.rstrip("/"), model, admission
        self.headers = {"Accept": "image/*"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        # open loop: every outstanding request holds a connection, the pool must not be what queues them
        self.client = httpx.AsyncClient(timeout=timeout_s, transport=transport, limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=64))
        self.served_model: str | None = None

    async def send(self, body: dict) -> dict[str, Any]:
        import httpx

        if self.model:
            body = {**body, "model": self.model}
        try:
            r = await self.client.post(f"{self.url}/v1/generate", json=body, headers=self.headers)
        except httpx.HTTPError as err:
            return {"outcome": "transport", "message": f"{type(err).__name__}: {err}"[:300]}
        is_json = "json" in r.headers.get("content-type", "")
        data = r.json() if is_json else None
        if r.status_code != 200:
            outcome, code, msg = classify(r.status_code, data if data is not None else r.text[:500])
            return {"outcome": outcome, "message": f"{r.status_code} {code or ''} {msg}"[:300]}
        if data is not None:
            self.served_model = data.get("model")
            return {"outcome": "ok", "batch_size": data.get("batch_size"),
                    "queue_s": (data.get("timings") or {}).get("queue_s"), "model": data.get("model")}
        self.served_model = r.headers.get("x-model")
        size = r.headers.get("x-batch-size")
        queue = _QUEUE_TIMING.search(r.headers.get("server-timing", ""))
        return {"outcome": "ok", "batch_size": int(size) if size else None,
                "queue_s": float(queue.group(1)) / 1000 if queue else None, "model": self.served_model}

    async def settle(self, timeout_s: float) -> int:
        return 0  # requests given up on were closed (cancelled tasks); what the server does with them is its own

    def recompiles(self) -> int | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"target": self.kind, "engine_api": self.engine_api, "url": self.url,
                "model": self.model or self.served_model, "model_source": None, "admission": self.admission}

    async def aclose(self) -> None:
        await self.client.aclose()
