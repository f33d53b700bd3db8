"""The model deployment: a thin Serve wrapper around one engine per replica.

The engine's step scheduler (core/step_scheduler.py) is the only batching layer: concurrent handle calls share
UNet calls as they arrive (continuous batching), so there is no @serve.batch and no GPU gate here. The class is
a plain class; `serving.builder` turns it into a Serve deployment with options computed from the config, so the
same code runs behind HTTP, DeploymentHandles and async jobs.
"""
from __future__ import annotations

import asyncio
import logging
import threading

from ray import serve

from core.config import EngineConfig
from core.schemas import GenerationError, GenerationRequest, GenerationResult

log = logging.getLogger("ray.serve")
# Adapter sets (multiplexed model ids, serving/lora_routing.py) a replica reports as held; a routing hint only:
# the host cache (loras.host_cache_mb) decides what stays in memory.
ADAPTER_SETS_PER_REPLICA = 32


class ModelServer:
    """Serve replica wrapping one `core.engine.Engine`.

    Handle API: `await handle.generate.remote(GenerationRequest(...))` returns a GenerationResult or raises
    GenerationError; `generate_outcome` returns the error instead of raising (what the ingress uses). A caller
    that goes away (client disconnect, timeout: Serve cancels the replica's task) stops its request at the next
    denoising step.
    """

    def __init__(self, engine_config: EngineConfig | dict):
        from core.engine import Engine
        from serving.metrics import ModelMetrics

        self.config = (engine_config if isinstance(engine_config, EngineConfig)
                       else EngineConfig.model_validate(engine_config))
        self.name = self.config.name
        self.metrics = ModelMetrics(self.name)
        # Load, optimize, compile and warm up here: Serve marks the replica ready only after __init__ returns.
        self.engine = Engine(self.config).load()
        self.engine.scheduler.observers.append(self.metrics.batch.observe)  # images per UNet call
        self.previews = None  # live previews of streamed (async job) requests, every previews.every_n_steps
        if self.config.previews.method != "none":
            from core.previews import PreviewMaker

            self.previews = PreviewMaker(self.config.previews, self.engine.family, self.engine.device,
                                         self.engine.dtype)
        log.info("model %s ready: %s", self.name, self.engine.info())

    # ------------------------------------------------------------------ public (handle) API
    async def generate(self, request: GenerationRequest | dict) -> GenerationResult:
        outcome = await self.generate_outcome(request)
        if isinstance(outcome, GenerationError):
            raise outcome
        return outcome

    async def generate_outcome(self, request: GenerationRequest | dict, on_progress=None,
                               cancel: threading.Event | None = None) -> GenerationResult | GenerationError:
        req = self._parse(request)
        if isinstance(req, GenerationError):
            self.metrics.observe_error(req.kind)
            return req
        set_id = serve.get_multiplexed_model_id()
        if set_id and await self._known_adapters(set_id):
            # routed here for its LoRAs: load them (and report the set to Serve's router) first
            await self.adapter_set(set_id)
        try:
            self.metrics.queue.set(self.engine.scheduler.waiting_requests() + 1)
            outcome = await self.engine.generate_async(req, on_progress=on_progress, cancel=cancel)
        finally:
            self.metrics.queue.set(self.engine.scheduler.waiting_requests())
        if isinstance(outcome, GenerationError):
            self.metrics.observe_error(outcome.kind)
        else:
            self.metrics.observe_result(outcome)
        self.metrics.observe_caches(self.engine.caches.stats())  # prompt-embedding / init-latent / control-map
        return outcome

    async def generate_stream(self, request: GenerationRequest | dict):
        """Streaming variant for async jobs: yields {"event": "progress", "step", "total"} after each denoising
        step, {"event": "preview", "step", "total", "images": [base64 JPEG per image]} every
        previews.every_n_steps steps, then {"event": "result", "outcome": GenerationResult | GenerationError}.
        Closing the stream cancels the request: its images leave the batch at the next step."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def on_progress(step: int, total: int, latents) -> None:  # GPU thread
            # Only preview steps pay for the latents' copy to the host; the JPEGs are made off the GPU thread.
            due = self.previews is not None and self.previews.due(step, total)
            loop.call_soon_threadsafe(events.put_nowait, (step, total, latents() if due else None))

        task = asyncio.ensure_future(self.generate_outcome(request, on_progress, cancel))
        try:
            while not task.done():
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    step, total, latents = getter.result()
                    yield {"event": "progress", "step": step, "total": total}
                    if latents is not None:
                        images = await asyncio.to_thread(self.previews.jpegs_b64, latents)
                        yield {"event": "preview", "step": step, "total": total, "images": images}
                else:
                    getter.cancel()
            yield {"event": "result", "outcome": task.result()}
        finally:
            cancel.set()  # no-op when finished; stops the request at the next step when the caller went away

    @serve.multiplexed(max_num_models_per_replica=ADAPTER_SETS_PER_REPLICA)
    async def adapter_set(self, set_id: str) -> list:
        """Load an adapter set (multiplexed model id: LoRA names joined by '|') into the host cache, off the
        event loop and the GPU thread. Best effort: names this model does not have are left to the request's own
        validation, which reports them."""
        from serving.lora_routing import adapter_names

        lora = self.engine.lora
        infos = [i for i in await asyncio.to_thread(lambda: [lora.library.get(n) for n in adapter_names(set_id)])
                 if i is not None]
        try:
            return await asyncio.wrap_future(lora.cache.fetch(infos))
        except Exception as err:  # noqa: BLE001 - the request itself reports why its LoRA cannot load
            log.info("adapter set %r not preloaded: %s", set_id, err)
            return []

    async def _known_adapters(self, set_id: str) -> bool:
        """Whether every LoRA of the set is in this model's library: a set with an unknown name is not loaded
        through Serve (it would be reported as held and skew routing); the request's validation reports it."""
        from serving.lora_routing import adapter_names

        lora = self.engine.lora
        if lora is None:
            return False
        return await asyncio.to_thread(lambda: all(lora.library.get(n) is not None for n in adapter_names(set_id)))

    async def loras(self) -> list[dict]:
        """This model's LoRA library (rescanned): see core.engine.Engine.loras."""
        return await asyncio.to_thread(self.engine.loras)

    async def info(self) -> dict:
        """The engine's info plus this replica's placement: `gpu_ids` (the GPU ids Ray assigned, logical on a
        host without CUDA; CUDA_VISIBLE_DEVICES is set from them), `ray_resources` (what Ray reserved for this
        replica, e.g. {"CPU": 0.5, "GPU": 0.5}), `replica` (Serve's replica id) and `adapter_sets`."""
        import ray

        ctx = ray.get_runtime_context()
        return {**self.engine.info(), "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
                "ray_resources": ctx.get_assigned_resources(),
                "gpu_fraction": self.config.memory.gpu_fraction,
                "max_batch_size": self.config.limits.max_batch_size,
                "replica": serve.get_replica_context().replica_id.unique_id, "pid": _pid(),
                "adapter_sets": self._adapter_sets(), **_vram_stats()}

    def _adapter_sets(self) -> list[str]:
        """The adapter sets this replica reports to Serve's router (its @serve.multiplexed cache)."""
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)  # set by serve.multiplexed on first use
        return list(wrapper.models) if wrapper is not None else []

    async def controlnets(self) -> list[dict]:
        """The ControlNets this replica's engine loaded: [{name, family, source}] (GET /v1/controlnets)."""
        return self.engine.list_controlnets()

    def check_health(self) -> None:
        # Raising makes Serve restart this replica (e.g. after a CUDA error left the context unusable).
        self.engine.check_health()

    def _parse(self, request: GenerationRequest | dict) -> GenerationRequest | GenerationError:
        try:
            return request if isinstance(request, GenerationRequest) else GenerationRequest.model_validate(request)
        except ValueError as err:  # pydantic ValidationError from a dict body
            from core.config import format_validation_error

            return GenerationError(format_validation_error(err), "validation", _first_field(err))


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
