"""The engine: one resident model behind one request API, used unchanged by Serve, async jobs and Ray Data.

The engine owns the denoising loop: `core/step_scheduler.py` batches images of any steps, scheduler, guidance and
seed into shared UNet calls (continuous batching, interleaving across shapes), each image with its own scheduler
and CPU generator (core/denoise_state.py), so an image depends only on its own request and seed - alone, inside
any batch, or joined at any step. This module loads and warms the model, resolves requests, and exposes
`await generate_async(request, on_progress, cancel)` (one request) and the sync `generate(requests)` (the CLI,
Ray Data, benchmarks), both through the one scheduler.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from core.config import EngineConfig, MemoryLevel
from core.denoise_state import Job, ProgressCallback
from core.caches import EngineCaches
from core.gpu_stage import Stopwatch, own_cudagraph_trees
from core.image_inputs import NO_URIS, UriPolicy
from core.schemas import GenerationError, GenerationRequest, GenerationResult
from core.step_scheduler import StepScheduler

log = logging.getLogger(__name__)

# (width, height, steps, guidance) when neither the request nor the config says.
FAMILY_DEFAULTS = {"sd15": (512, 512, 30, 7.5), "sd21": (768, 768, 30, 7.5), "sdxl": (1024, 1024, 30, 5.0)}
TINY_DEFAULTS = (64, 64, 4, 5.0)  # embedded tiny models: small and quick, they make noise anyway

# generate()'s step_callback: ([request index], UNet calls done, total calls); raising GenerationCancelled in it
# stops that request at this step.
StepCallback = Callable[[Sequence[int], int, int], None]
Outcome = GenerationResult | GenerationError


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.pipe = None
        self.family: str | None = None
        self.level: MemoryLevel = config.memory.level
        self.applied: dict = {}
        self.broken: str | None = None  # set after an unrecoverable (CUDA) error; check_health reports it
        self.budget: int | None = None
        self.footprint = None
        self.tiled_sizes: set[tuple[int, int]] = set()  # sizes that ran out of memory untiled: decode them tiled
        self._load_lock = threading.Lock()
        self._ready = False
        # PNG/JPEG encoders release the GIL: a few threads keep up with a batch while the GPU runs the next one.
        self._encoder = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                                           thread_name_prefix="encode")
        # The step scheduler's loop (warm-up included) runs on this one thread: calls are serialized, and CUDA
        # graphs recorded by torch.compile (reduce-overhead) are per thread - other threads would record their own.
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu",
                                       initializer=own_cudagraph_trees if config.optimization.compile != "none"
                                       else None)
        self.note = None
        self.load_s = self.warmup_s = 0.0
        self.warmup_times: dict[str, float] = {}  # per warm-up shape: where a slow start goes
        self.load_times: dict[str, float] = {}  # per load stage
        self.step_cache = None
        self.lora = None  # core/lora_runtime.LoraRuntime when the config has a LoRA library
        self.prompt_encoder = None  # core/prompt_weighting.WeightedPromptEncoder with prompt_weighting on
        self.compiled = False
        self.scheduler = StepScheduler(self)
        self.caches = EngineCaches(config.caches)
        self.controlnets: dict = {}  # name -> diffusers ControlNetModel (config.controlnets, loaded with the model)

    # ------------------------------------------------------------------ loading
    def load(self) -> "Engine":
        """Load once, optimize in the documented order, place per memory level, warm up. Idempotent."""
        with self._load_lock:  # concurrent first calls load once and wait for the warm-up
            if not self._ready:
                self._load()
                self._ready = True
        return self

    def _load(self) -> None:
        from core import memory, optimizations
        from core.embedded import NOISE_NOTE
        from core.loading import load_pipeline, resolve_device, resolve_dtype

        t0 = time.perf_counter()
        mark = Stopwatch(self.load_times)
        cfg = self.config
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        mark("device")  # torch import + CUDA init
        pipe, self.family = load_pipeline(cfg, self.device, self.dtype,   # 1. dtype
                                          onto_device=self.level == MemoryLevel.NONE)
        mark("read")
        pipe.set_progress_bar_config(disable=True)
        self.base_scheduler_config = pipe.scheduler.config
        self.footprint = memory.footprint_of(pipe)
        if cfg.controlnets:  # resident on the device at every memory level; counted in the footprint
            from core.controlnet import load_controlnets

            self.controlnets = load_controlnets(self, pipe)
            self.footprint = memory.ModelFootprint(self.footprint.unet, self.footprint.text_encoders,
                                                   self.footprint.vae, sum(map(memory.module_bytes,
                                                                               self.controlnets.values())))
            mark("controlnets")
        self.budget = memory.enforce_budget(cfg.memory, self.device)
        if self.level == MemoryLevel.AUTO:
            w, h, *_ = self.family_defaults()
            self.level = memory.pick_level(self.footprint, self.family, self.budget, w, h,
                                           streamed_share=cfg.memory.streamed_share,
                                           lookahead=cfg.memory.stream_lookahead)
            log.info("memory level AUTO -> %s (budget %s)", self.level.value, self.budget)
        # Fully resident: move first, so QKV fusion and channels_last run on the GPU (seconds faster for SDXL
        # than on the host). Offload levels need the optimized modules before their hooks wrap them.
        resident = self.level == MemoryLevel.NONE
        if resident:
            self.streamers = memory.apply_level(pipe, self.level, self.device, self.dtype, cfg.memory)  # 7
            mark("place")
        self.applied = optimizations.apply_pre_placement(pipe, cfg.optimization, self.device)  # 2-6
        mark("optimize")
        if not resident:
            self.streamers = memory.apply_level(pipe, self.level, self.device, self.dtype, cfg.memory)  # 7
            mark("place")
        self.applied["memory_level"] = self.level.value
        if self.level != MemoryLevel.NONE and self.device.startswith("cuda"):  # (levels are CUDA-only)
            self.applied["fp8_storage"] = cfg.memory.fp8_storage
        if self.streamers:
            self.applied["streamed_gib"] = round(sum(s.streamed_bytes for s in self.streamers) / memory.GiB, 2)
        self.pipe = pipe
        if cfg.prompt_weighting:
            from core.prompt_weighting import WeightedPromptEncoder

            self.prompt_encoder = WeightedPromptEncoder(pipe, self.family, cfg.prompt_chunks, self.device)
            self.applied["prompt_weighting"] = cfg.prompt_chunks
        from core.fastpath import install_fastpath

        self.applied.update(install_fastpath(self))  # 8. fp8 / step caching / compile
        mark("fastpath")
        if self.compiled:  # the store's compile artifacts into the local caches, before the warm-up compiles
            from core import compile_cache

            loaded = compile_cache.load(self)
            self.applied.update(compile_cache_hit=loaded["hit"], compile_artifacts=loaded)
            mark("compile_artifacts")  # the store's read + load_cache_artifacts: part of a fresh node's start
        self.monitor = memory.MemoryMonitor(self.device)
        if cfg.is_noise_model:
            self.note = NOISE_NOTE
        self.load_s = time.perf_counter() - t0
        self.warmup()
        self.scheduler.mark_warm()
        if self.compiled:  # counters; artifacts uploaded to the store when the warm-up compiled
            from core import compile_cache

            self.applied.update(compile_cache.after_warmup(self))
        log.info("model %s (%s) ready on %s %s in %.1fs (+%.1fs warm-up): %s", cfg.name, self.family, self.device,
                 str(self.dtype).replace("torch.", ""), self.load_s, self.warmup_s, self.applied)

    def family_defaults(self) -> tuple[int, int, int, float]:
        if self.config.embedded_name in ("tiny-sd", "tiny-sdxl", "tiny-sd-inpaint"):
            return TINY_DEFAULTS
        return FAMILY_DEFAULTS[self.family or "sd15"]

    def default_guidance(self) -> float:
        g = self.config.defaults.guidance_scale
        return self.family_defaults()[3] if g is None else g

    def warmup_shapes(self) -> list[tuple[int, int, int]]:
        w, h, *_ = self.family_defaults()
        d = self.config.defaults
        return list(self.config.optimization.warmup_shapes) or [(d.width or w, d.height or h, 1)]

    def warmup(self) -> None:
        """Run the configured shapes once. Compiled: every UNet row bucket (core.fastpath.row_buckets) and VAE
        image bucket up to each shape's batch, so serving never compiles."""
        steps = self.config.optimization.warmup_steps
        self._calibrate_fp8(max(steps, 2))
        if steps == 0:
            return
        from core.fastpath import image_buckets, row_buckets

        t0 = time.perf_counter()
        self._warming = True  # compiled: every batch bucket up to b is compiled (and recorded) now, not mid-serving
        try:
            for w, h, b in self.warmup_shapes():
                sizes = [m for m in image_buckets(self) if m <= b] if self.compiled else [b]
                uncovered = set(row_buckets(self)) - {2 * m for m in sizes} if self.compiled else set()
                for n in sizes:
                    # with CFG (2n rows); and without (n rows) where that is a bucket no CFG run covers
                    for guidance in (7.5, 1.0) if n in uncovered else (7.5,):
                        t = time.perf_counter()
                        self._warm(w, h, n, steps, guidance)
                        name = f"{w}x{h}x{n}" + ("" if guidance > 1 else "-nocfg")
                        self.warmup_times[name] = round(time.perf_counter() - t, 2)
        finally:
            self._warming = False
        self.warmup_s = time.perf_counter() - t0

    def _warm(self, w: int, h: int, n: int, steps: int, guidance: float | None) -> None:
        """n images in one UNet call (requests of <= max_images_per_request images, submitted together)."""
        per_req = self.config.limits.max_images_per_request
        reqs = [GenerationRequest(prompt="warm-up", width=w, height=h, steps=steps, seed=i, guidance_scale=guidance,
                                  num_images=min(per_req, n - i)) for i in range(0, n, per_req)]
        for out in self._run(reqs, encode=False):
            if isinstance(out, GenerationError):
                raise RuntimeError(f"warm-up at {w}x{h} batch {n} failed: {out.message}")

    def _calibrate_fp8(self, steps: int) -> None:
        """Static FP8: one call at the first warm-up shape records each layer's input range. It runs before the
        warm-up marks shapes as compiled, so shape_context keeps it eager (no graph with the recording in it)."""
        if self.config.optimization.fp8 != "static":
            return
        from core import fp8

        if not fp8.static_layers(self.pipe.unet):  # refused: this GPU has no FP8 tensor cores
            return
        w, h, _ = self.warmup_shapes()[0]
        with fp8.calibrating(self.pipe.unet):
            for out in self._run([GenerationRequest(prompt="calibration", negative_prompt="low quality", width=w,
                                                    height=h, steps=steps, seed=0)], encode=False):
                if isinstance(out, GenerationError):
                    raise RuntimeError(f"fp8 calibration at {w}x{h} failed: {out.message}")

    # ------------------------------------------------------------------ requests
    def resolve(self, req: GenerationRequest, uris: UriPolicy = NO_URIS) -> GenerationRequest:
        """Fill defaults and enforce this model's limits. Raises GenerationError(kind='validation', field=...).

        Input images are decoded and checked here (limits: config.image_inputs); `uris`: which image URIs the
        request may name (HTTP: the ingress's allowlist; batch jobs: ANY_URI; default: none)."""
        return self.resolve_with_images(req, uris)[0]

    def resolve_with_images(self, req: GenerationRequest, uris: UriPolicy = NO_URIS):
        """resolve(), the request's init/mask images at its output size (core.img2img.ImageConditioning, or
        None) and its control maps (a core.controlnet.ControlSpec per control[i])."""
        from core.resolve import resolve_request

        return resolve_request(self, req, uris)

    def generate(self, requests: Sequence[GenerationRequest], step_callback: StepCallback | None = None,
                 queue_s: Sequence[float] | None = None, uris: UriPolicy = NO_URIS) -> list[Outcome]:
        """One outcome per request, in order: a GenerationResult, or a GenerationError for that request alone.
        The requests are submitted together (so they start together) and share UNet calls with whatever else
        the scheduler is running."""
        if not self._ready:
            self.load()
        return self._run(requests, step_callback, queue_s, uris=uris)

    async def generate_async(self, request: GenerationRequest, on_progress: ProgressCallback | None = None,
                             cancel: threading.Event | None = None, timeout_s: float | None = None,
                             queue_s: float = 0.0, uris: UriPolicy = NO_URIS) -> Outcome:
        """One request; never raises for a request's own failure (returns the GenerationError).

        on_progress(step, total, latents) runs on the GPU thread after each UNet call that advanced the request
        (keep it short: e.g. loop.call_soon_threadsafe); `latents()` gives a CPU copy of its current latents.
        Setting `cancel`, passing `timeout_s`, or cancelling the awaiting task stops the request at the next step:
        its images leave the batch (the others' are unchanged) and the replica is free for other work."""
        if not self._ready:
            await asyncio.to_thread(self.load)
        args = (request, on_progress, cancel, timeout_s, queue_s)
        # decoding images, or resolving LoRA names (a library rescan may hit a remote URI), must not block the loop
        if request.init_image is not None or request.control or (
                self.lora is not None and (request.loras or "<lora:" in request.prompt.lower())):
            job = await asyncio.to_thread(self.submit, *args, uris=uris)
        else:
            job = self.submit(*args, uris=uris)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancel.set()  # (wrap_future cancelled job.future too: its samples leave at the next step)
            raise

    def submit(self, request: GenerationRequest, on_progress: ProgressCallback | None = None,
               cancel: threading.Event | None = None, timeout_s: float | None = None, queue_s: float = 0.0,
               encode: bool = True, uris: UriPolicy = NO_URIS) -> Job:
        """Queue one request without waiting: returns its Job (`.future`: a concurrent Future of the outcome,
        already set for a request that fails validation; `.cancel`: set it to stop the request)."""
        if not self._ready:
            self.load()
        job = self._job(request, 0, on_progress, cancel, timeout_s, queue_s, encode, uris)
        if isinstance(job, GenerationError):
            failed = Job(request, cancel=cancel or threading.Event())
            failed.fail(job)
            return failed
        self._schedule([job])
        return job

    def _schedule(self, jobs: list[Job]) -> None:
        """Hand jobs to the step scheduler together (so they start together); a job whose LoRAs are not in the
        host cache yet follows alone once they are (loaded off the GPU thread: core/lora_runtime.py)."""
        if self.lora is None:
            self.scheduler.submit(jobs)
            return
        waits = {id(j): self.lora.prepare(j) for j in jobs if j.request.loras}
        ready = [j for j in jobs if id(j) not in waits or (waits[id(j)].done() and waits[id(j)].result())]
        self.scheduler.submit(ready)
        for job in jobs:
            wait = waits.get(id(job))
            if wait is not None and not wait.done():
                wait.add_done_callback(lambda fut, job=job: fut.result() and self.scheduler.submit([job]))

    def _job(self, request, index: int, on_progress, cancel, timeout_s, queue_s: float, encode: bool,
             uris: UriPolicy = NO_URIS):
        try:
            req, images, controls = self.resolve_with_images(request, uris)
            self.check_capacity(req)
        except GenerationError as err:
            return err
        job = Job(req, index, on_progress, cancel or threading.Event(), extra_queue_s=queue_s, encode=encode)
        job.images, job.controls = images, controls
        if timeout_s is not None:
            job.deadline = job.submitted + timeout_s
        return job

    def _run(self, requests: Sequence[GenerationRequest], step_callback: StepCallback | None = None,
             queue_s: Sequence[float] | None = None, encode: bool = True, uris: UriPolicy = NO_URIS) -> list:
        jobs = []
        for i, request in enumerate(requests):
            progress = None
            if step_callback is not None:
                progress = (lambda i: lambda step, total, _latents: step_callback([i], step, total))(i)
            jobs.append(self._job(request, i, progress, None, None, queue_s[i] if queue_s else 0.0, encode, uris))
        self._schedule([j for j in jobs if isinstance(j, Job)])
        return [j.future.result() if isinstance(j, Job) else j for j in jobs]

    def finish_image(self, sample, pixels) -> None:
        """A decoded image (GPU thread): encode it on the pool; the request's last encode completes it."""
        job = sample.job
        job.images_left -= 1
        if not job.encode:
            if job.images_left == 0:
                job.settle(None)  # warm-up: no result to build
            return
        from core.results import encode_result_image, maybe_complete

        fut = self._encoder.submit(encode_result_image, self, pixels, job, sample.seed)
        job.encodes.append((sample.image_index, sample.seed, fut))
        fut.add_done_callback(lambda _f: maybe_complete(self, job))

    def max_batch_for(self, width: int, height: int) -> int:
        """Images per pipeline call at this size: limits.max_batch_size, capped by the VRAM budget's estimate
        (0: not even one image fits)."""
        from core.memory import max_batch_within

        cap = self.config.limits.max_batch_size
        if self.budget is None:
            return cap
        return max_batch_within(self.footprint, self.family, self.level, self.budget, width, height, cap,
                                self.config.memory.streamed_share, self.config.memory.stream_lookahead)

    def check_capacity(self, req: GenerationRequest) -> None:
        """Reject, instead of running out of memory, a resolved request that cannot fit the budget at batch 1."""
        if self.max_batch_for(req.width, req.height) > 0:
            return
        from core.memory import GiB, estimate_peak_bytes

        need = estimate_peak_bytes(self.footprint, self.family, self.level, req.width, req.height, 1,
                                   self.config.memory.streamed_share, self.config.memory.stream_lookahead)
        raise GenerationError(
            f"{req.width}x{req.height} needs about {need / GiB:.1f} GiB at memory level {self.level.value}; this "
            f"replica's VRAM budget is {self.budget / GiB:.1f} GiB: use a smaller size or a lower-memory level",
            "capacity", "width")

    def internal_error(self, err: Exception) -> GenerationError:
        log.exception("generation failed: %s", err)
        if "CUDA error" in str(err) or "CUBLAS" in str(err):
            self.broken = f"CUDA error: {err}"  # the context is unusable; check_health makes Serve replace us
        return GenerationError(f"generation failed: {type(err).__name__}: {err}", "internal", None)

    def _decode(self, latents, force_tiling: bool):
        from core.gpu_stage import decode_latents

        return decode_latents(self.pipe.vae, latents, force_tiling)  # on the GPU thread: never concurrent

    # ------------------------------------------------------------------ health / info
    def check_health(self) -> None:
        if not self._ready:
            raise RuntimeError("engine not loaded")
        if self.broken:
            raise RuntimeError(self.broken)

    def info(self) -> dict:
        return {"name": self.config.name, "family": self.family, "source": self.config.source,
                "device": getattr(self, "device", None), "dtype": str(getattr(self, "dtype", "")).replace("torch.", ""),
                "optimizations": self.applied, "vram_budget_bytes": self.budget, "note": self.note,
                "load_s": round(self.load_s, 3), "warmup_s": round(self.warmup_s, 3), "load_times": self.load_times,
                "warmup_times": self.warmup_times, "scheduling": self.scheduling_stats(),
                "caches": self.caches.stats(), "controlnets": self.list_controlnets(),
                "loras": self.lora.stats() if self.lora is not None else None,
                "aoti": self.aoti.report() if getattr(self, "aoti", None) is not None else None}

    def list_controlnets(self) -> list[dict]:
        """The ControlNets this model serves (GET /v1/controlnets): [{name, family, source}]; family is the
        model's (checked at load), None before loading."""
        from core.controlnet import describe

        return describe(self)

    def loras(self) -> list[dict]:
        """The LoRA library (rescanned): name, family, rank, size_bytes, layout, trigger_words, components and
        whether it is in the host cache; [] without a library."""
        if not self._ready:
            self.load()
        return self.lora.entries() if self.lora is not None else []

    def scheduling_stats(self) -> dict:
        """The step scheduler's counters: admission policy, UNet calls, images per call, recompiles while
        serving (each one a stall: should stay 0), requests waiting, images in flight, requests stopped early
        (cancelled: caller gone, timeout; or past their deadline), and the cross-shape policy's min_share and unit
        (calls or time) with its picks by rule (least-work, owed: a group's share, starved: the time bound) and the
        measured ms per UNet call by group ("model WxH", with the step cache "... full" / "... shallow")."""
        sched = self.scheduler
        return {"admission": self.config.scheduling.admission, "min_share": self.config.scheduling.min_share,
                "share_unit": sched.share_unit(), "picks": dict(sched.policy.picks),
                "call_ms": sched.timer.report_ms(), "unet_calls": sched.calls,
                "batch_size_histogram": {str(k): v for k, v in sorted(sched.batch_histogram.items())},
                "recompiles": sched.recompiles, "waiting_requests": sched.waiting_requests(),
                "active_images": sched.active_images(), "cancelled_requests": sched.cancelled_requests}
