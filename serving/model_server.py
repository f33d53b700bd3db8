"""The model deployment: one engine per replica, fed by Ray Serve's dynamic batching.

The class is a plain class; `serving.builder` turns it into a Serve deployment with options computed from
the config, so the same code runs behind HTTP, DeploymentHandles and async jobs.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ray import serve

from core.config import EngineConfig
from core.schemas import GenerationCancelled, GenerationError, GenerationRequest, GenerationResult

log = logging.getLogger("ray.serve")

# Batches @serve.batch may hold at once. Ray 2.60 forms the next batch as soon as its batch_wait_timeout_s
# expires, even while the previous batch still holds the GPU (wait_for_batch runs before the
# max_concurrent_batches semaphore), so under load batches would fragment into whatever arrived in one
# timeout window. Letting several formed batches in and coalescing them at the GPU gate (ModelServer._run_batch)
# makes a GPU run take everything that queued while the previous one ran, up to max_batch_size images.
# max_ongoing_requests bounds how many batches really exist, so this only needs to be large.
FORMED_BATCHES = 64


class _QuietBatchWarning(logging.Filter):
    """Drop Serve's "max_batch_size * max_concurrent_batches > max_ongoing_requests" warning: with the GPU gate
    the product is meant to exceed it (see FORMED_BATCHES), and batches still fill to max_batch_size."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


logging.getLogger("ray.serve").addFilter(_QuietBatchWarning())


@dataclass
class _Pending:
    """One request waiting for a batch. `cap` bounds its weight so a large request still fits a batch."""

    request: GenerationRequest
    arrived: float
    cap: int
    progress: Callable[[int, int], None] | None = None  # called from the engine thread after each step
    cancelled: threading.Event = field(default_factory=threading.Event)
    rendering: object = None  # the engine's Rendering (or GenerationError) once its GPU work ran

    @property
    def weight(self) -> int:
        return min(self.request.num_images, self.cap)


def _batch_images(items: list[_Pending]) -> int:
    # @serve.batch counts images, not requests: max_batch_size bounds the work of one pipeline call.
    return sum(item.weight for item in items)


class ModelServer:
    """Serve replica wrapping one `core.engine.Engine`.

    Handle API: `await handle.generate.remote(GenerationRequest(...))` returns a GenerationResult or raises
    GenerationError; `generate_outcome` returns the error instead of raising (what the ingress uses).
    """

    def __init__(self, engine_config: dict, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01):
        from core.engine import Engine
        from serving.metrics import ModelMetrics

        self.config = EngineConfig.model_validate(engine_config)
        self.name = self.config.name
        self.max_batch_size = max_batch_size
        self._run_batch.set_max_batch_size(max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.metrics = ModelMetrics(self.name)
        self._waiting = 0
        self._queued: collections.deque[_Pending] = collections.deque()  # formed batches' items, oldest first
        self._gpu_gate = asyncio.Lock()
        self._inflight: asyncio.Future | None = None
        # Load, optimize, compile and warm up here: Serve marks the replica ready only after __init__ returns.
        self.engine = Engine(self.config).load()
        log.info("model %s ready: %s", self.name, self.engine.info())

    # ------------------------------------------------------------------ public (handle) API
    async def generate(self, request: GenerationRequest | dict) -> GenerationResult:
        outcome = await self.generate_outcome(request)
        if isinstance(outcome, GenerationError):
            raise outcome
        return outcome

    async def generate_outcome(self, request: GenerationRequest | dict) -> GenerationResult | GenerationError:
        try:
            req = request if isinstance(request, GenerationRequest) else GenerationRequest.model_validate(request)
            # Resolve before queueing: limits fail fast, and the seed is fixed before any batching.
            req = self.engine.resolve(req)
        except GenerationError as err:
            self.metrics.observe_error(err.kind)
            return err
        except ValueError as err:  # pydantic ValidationError from a dict body
            from core.config import format_validation_error

            self.metrics.observe_error("validation")
            return GenerationError(format_validation_error(err), "validation", _first_field(err))
        self._waiting += 1
        self.metrics.queue.set(self._waiting)
        try:
            rendering = await self._run_batch(_Pending(req, time.perf_counter(), self.max_batch_size))
        finally:
            self._waiting -= 1
            self.metrics.queue.set(self._waiting)
        return await self._finish(rendering)

    async def _finish(self, rendering) -> GenerationResult | GenerationError:
        """Await the images' encodes (thread pool, outside the GPU gate) and build the outcome."""
        for fut in getattr(rendering, "futures", ()):
            try:
                await asyncio.wrap_future(fut)
            except Exception:  # noqa: BLE001 - collect() turns it into this request's error
                break
        outcome = self.engine.collect(rendering)
        if isinstance(outcome, GenerationError):
            self.metrics.observe_error(outcome.kind)
        else:
            self.metrics.observe_result(outcome)
        return outcome

    async def generate_stream(self, request: GenerationRequest | dict):
        """Streaming variant for async jobs: yields {"event": "progress", "step", "total"} after each denoising
        step, then {"event": "result", "outcome": GenerationResult | GenerationError}. Cancelling the stream
        cancels the request: its batch stops at the next step when no other live request shares it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            req = request if isinstance(request, GenerationRequest) else GenerationRequest.model_validate(request)
            req = self.engine.resolve(req)
        except (GenerationError, ValueError) as err:
            outcome = await self.generate_outcome(request)  # same error mapping as the unary path
            yield {"event": "result", "outcome": outcome}
            return
        pending = _Pending(req, time.perf_counter(), self.max_batch_size,
                           progress=lambda s, t: loop.call_soon_threadsafe(events.put_nowait, (s, t)))
        task = asyncio.ensure_future(self._run_batch(pending))
        try:
            while not task.done():
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    step, total = getter.result()
                    yield {"event": "progress", "step": step, "total": total}
                else:
                    getter.cancel()
            yield {"event": "result", "outcome": await self._finish(task.result())}
        finally:
            pending.cancelled.set()  # no-op when finished; stops the denoising loop when the caller went away

    async def info(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {**self.engine.info(), "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
                "gpu_fraction": self.config.memory.gpu_fraction, "max_batch_size": self.max_batch_size,
                "replica": serve.get_replica_context().replica_id.unique_id, "pid": _pid(), **_vram_stats()}

    def check_health(self) -> None:
        # Raising makes Serve restart this replica (e.g. after a CUDA error left the context unusable).
        self.engine.check_health()

    # ------------------------------------------------------------------ batching
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=FORMED_BATCHES,
                 batch_size_fn=_batch_images)
    async def _run_batch(self, items: list[_Pending]) -> list:
        """Returns each item's Rendering (GPU work done, encodes running) or GenerationError."""
        self._queued.extend(items)
        while any(item.rendering is None for item in items):
            async with self._gpu_gate:  # FIFO: whoever holds it runs the oldest queued items, maybe ours
                if all(item.rendering is not None for item in items):
                    break
                take = self._take_queued()
                if take:  # its own task: a cancelled caller never leaves taken items without an outcome
                    self._inflight = asyncio.ensure_future(self._run_on_gpu(take))
                await asyncio.shield(self._inflight)
        return [item.rendering for item in items]

    def _take_queued(self) -> list[_Pending]:
        """The oldest queued items up to max_batch_size images (at least one)."""
        take, images = [], 0
        while self._queued and (not take or images + self._queued[0].weight <= self.max_batch_size):
            item = self._queued.popleft()
            take.append(item)
            images += item.weight
        return take

    async def _run_on_gpu(self, items: list[_Pending]) -> None:
        # The engine groups by compat key and runs every group (oldest first) in this call, so each request
        # finishes in the run that took it: no group waits for another run.
        start = time.perf_counter()
        requests = [item.request for item in items]
        queue_s = [max(0.0, start - item.arrived) for item in items]
        self.metrics.batch.observe(sum(r.num_images for r in requests))

        def on_step(indices, step: int, total: int) -> None:
            for i in indices:
                if items[i].progress is not None:
                    items[i].progress(step, total)
            if all(items[i].cancelled.is_set() for i in indices):  # never stop work another request still wants
                raise GenerationCancelled(f"cancelled at step {step}/{total}")

        try:
            renderings = await asyncio.to_thread(self.engine.submit, requests, on_step, queue_s)
        except Exception as err:  # noqa: BLE001 - every taken item must get an outcome, or its caller hangs
            renderings = [self.engine.internal_error(err)] * len(items)
        for item, rendering in zip(items, renderings):
            item.rendering = rendering


def _first_field(err: Exception) -> str | None:
    errors = getattr(err, "errors", None)
    if callable(errors):
        for e in errors():
            if e.get("loc"):
                return str(e["loc"][0])
    return None


def _vram_stats() -> dict:
    """This process's CUDA allocator figures (what the VRAM budget caps), in bytes; empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"vram_allocated_bytes": torch.cuda.memory_allocated(), "vram_reserved_bytes": torch.cuda.memory_reserved(),
            "vram_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "vram_peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def _pid() -> int:
    import os

    return os.getpid()
