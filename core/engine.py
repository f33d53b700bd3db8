"""The engine: one resident model, `generate(requests) -> results`, used unchanged by Serve, jobs and Ray Data.

Each pipeline call gets its own shallow pipeline copy and a fresh scheduler (diffusers schedulers and the
pipeline's per-call attributes are not thread-safe), per-sample prompts and per-sample CPU generators, so an
image depends only on its own request and seed - alone or inside any batch, on any device.
"""
from __future__ import annotations

import copy
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Hashable, Sequence

from core.batching import Sample, plan_batches
from core.config import EngineConfig, MemoryLevel
from core.gpu_stage import Rendering, Stopwatch, own_cudagraph_trees
from core.schemas import MEDIA_TYPES, MAX_SEED, GeneratedImage, GenerationCancelled, GenerationError, \
    GenerationRequest, GenerationResult, Timings

log = logging.getLogger(__name__)

# (width, height, steps, guidance) when neither the request nor the config says.
FAMILY_DEFAULTS = {"sd15": (512, 512, 30, 7.5), "sd21": (768, 768, 30, 7.5), "sdxl": (1024, 1024, 30, 5.0)}
TINY_DEFAULTS = (64, 64, 4, 5.0)  # embedded tiny models: small and quick, they make noise anyway

StepCallback = Callable[[Sequence[int], int, int], None]  # (request indices, step done, total steps)
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
        # Every pipeline call (warm-up included) runs on this one thread: calls are serialized, and CUDA graphs
        # recorded by torch.compile (reduce-overhead) are per thread - other threads would record their own.
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu",
                                       initializer=own_cudagraph_trees if config.optimization.compile != "none"
                                       else None)
        self.note = None
        self.load_s = self.warmup_s = 0.0
        self.warmup_times: dict[str, float] = {}  # per warm-up shape: where a slow start goes
        self.load_times: dict[str, float] = {}  # per load stage
        self.aot_forwards: list = []  # core/aot_forward.py forwards, when compile_artifacts=aot

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
        from core.fastpath import install_fastpath

        self.applied.update(install_fastpath(self))  # 8. fp8 / step caching / compile
        mark("fastpath")
        self.monitor = memory.MemoryMonitor(self.device)
        if cfg.is_noise_model:
            self.note = NOISE_NOTE
        self.load_s = time.perf_counter() - t0
        self.warmup()
        if self.compiled:
            from core import compile_cache

            self.applied["compile_counters"] = compile_cache.counters()
            if self.aot_forwards:
                from core import aot_forward

                self.applied.update(aot_forward.report(self.aot_forwards))
            if not self.applied.get("compile_cache_hit"):
                compile_cache.save(self)
        log.info("model %s (%s) ready on %s %s in %.1fs (+%.1fs warm-up): %s", cfg.name, self.family, self.device,
                 str(self.dtype).replace("torch.", ""), self.load_s, self.warmup_s, self.applied)

    def family_defaults(self) -> tuple[int, int, int, float]:
        if self.config.embedded_name in ("tiny-sd", "tiny-sdxl"):
            return TINY_DEFAULTS
        return FAMILY_DEFAULTS[self.family or "sd15"]

    def warmup_shapes(self) -> list[tuple[int, int, int]]:
        w, h, *_ = self.family_defaults()
        d = self.config.defaults
        return list(self.config.optimization.warmup_shapes) or [(d.width or w, d.height or h, 1)]

    def warmup(self) -> None:
        steps = self.config.optimization.warmup_steps
        self._calibrate_fp8(max(steps, 2))
        if steps == 0:
            return
        from core.fastpath import batch_buckets

        t0 = time.perf_counter()
        self._warming = True  # compiled: every batch bucket up to b is compiled (and recorded) now, not mid-serving
        for forward in self.aot_forwards:
            forward.compiling = True  # warmed shapes load (or compile and save) their AOT functions
        try:
            for w, h, b in self.warmup_shapes():
                buckets = batch_buckets(self.config.limits.max_batch_size, self.config.optimization.batch_buckets)
                sizes = [n for n in buckets if n <= b] if self.compiled else [b]
                per_req = self.config.limits.max_images_per_request
                for n in sizes:
                    # Requests of <= max_images_per_request images; one compat key, so they run as one call.
                    reqs = [GenerationRequest(prompt="warm-up", width=w, height=h, steps=steps, seed=i,
                                              num_images=min(per_req, n - i)) for i in range(0, n, per_req)]
                    t = time.perf_counter()
                    for out in self.submit(reqs, _warmup=True):
                        if isinstance(out, GenerationError):
                            raise RuntimeError(f"warm-up at {w}x{h} batch {n} failed: {out.message}")
                    self.warmup_times[f"{w}x{h}x{n}"] = round(time.perf_counter() - t, 2)
        finally:
            self._warming = False
            for forward in self.aot_forwards:
                forward.compiling = False
        self.warmup_s = time.perf_counter() - t0

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
            for out in self.submit([GenerationRequest(prompt="calibration", negative_prompt="low quality", width=w,
                                                      height=h, steps=steps, seed=0)], _warmup=True):
                if isinstance(out, GenerationError):
                    raise RuntimeError(f"fp8 calibration at {w}x{h} failed: {out.message}")

    # ------------------------------------------------------------------ requests
    def resolve(self, req: GenerationRequest) -> GenerationRequest:
        """Fill defaults and enforce this model's limits. Raises GenerationError(kind='validation', field=...)."""
        cfg, lim = self.config, self.config.limits
        if req.model is not None and req.model != cfg.name:
            raise GenerationError(f"unknown model {req.model!r}; this engine serves {cfg.name!r}", "validation", "model")
        w, h, steps, guidance = self.family_defaults()
        d = cfg.defaults
        fill = {
            "width": req.width or d.width or w, "height": req.height or d.height or h,
            "steps": req.steps or d.steps or steps,
            "guidance_scale": req.guidance_scale if req.guidance_scale is not None else (
                d.guidance_scale if d.guidance_scale is not None else guidance),
            "scheduler": req.scheduler or cfg.scheduler,
            "negative_prompt": req.negative_prompt if req.negative_prompt is not None else d.negative_prompt,
            "seed": req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1),
            "model": cfg.name,
        }
        checks = [
            ("prompt", len(req.prompt) <= lim.max_prompt_chars, f"at most {lim.max_prompt_chars} characters"),
            ("width", fill["width"] <= lim.max_width, f"must be <= {lim.max_width}"),
            ("height", fill["height"] <= lim.max_height, f"must be <= {lim.max_height}"),
            ("width", fill["width"] * fill["height"] <= lim.max_pixels,
             f"width x height = {fill['width'] * fill['height']} exceeds max_pixels {lim.max_pixels}"),
            ("steps", fill["steps"] <= lim.max_steps, f"must be <= {lim.max_steps}"),
            ("num_images", req.num_images <= lim.max_images_per_request,
             f"must be <= {lim.max_images_per_request}"),
        ]
        for field, ok, why in checks:
            if not ok:
                raise GenerationError(f"{field}: {why} for model {cfg.name}", "validation", field)
        return req.model_copy(update=fill)

    def generate(self, requests: Sequence[GenerationRequest], step_callback: StepCallback | None = None,
                 queue_s: Sequence[float] | None = None) -> list[Outcome]:
        """One outcome per request, in order: a GenerationResult, or a GenerationError for that request alone."""
        return [self.collect(r) for r in self.submit(requests, step_callback, queue_s)]

    def submit(self, requests: Sequence[GenerationRequest], step_callback: StepCallback | None = None,
               queue_s: Sequence[float] | None = None, _warmup: bool = False) -> list[Rendering | GenerationError]:
        """The GPU stage: denoise + decode every request (one pipeline call at a time per engine). Encoding is
        started on a thread pool as each chunk finishes and is awaited by `collect`, so a server can start the
        next batch's GPU work while this one's images are still being encoded."""
        if not self._ready and not _warmup:
            self.load()
        t_start = time.perf_counter()
        outcomes: list[Rendering | GenerationError | None] = [None] * len(requests)
        for i, req in enumerate(requests):
            try:
                req = self.resolve(req)
                self.check_capacity(req)
                outcomes[i] = Rendering(req, t_start, queue_s[i] if queue_s else 0.0)
            except GenerationError as err:
                outcomes[i] = err
        resolved = [(i, r.request) for i, r in enumerate(outcomes) if isinstance(r, Rendering)]

        def run_all() -> None:
            for key, samples in plan_batches(resolved, lambda key: self.max_batch_for(key[1], key[2])):
                live = [s for s in samples if isinstance(outcomes[s.request_index], Rendering)]
                if live:
                    self._run_group(key, live, step_callback, outcomes, encode=not _warmup)

        if resolved:
            self._gpu.submit(run_all).result()
        return outcomes  # type: ignore[return-value]

    def _run_group(self, key, samples: list[Sample], cb: StepCallback | None, outcomes: list, encode: bool) -> None:
        for chunk, result in self._run_with_oom_retry(key, samples, cb):
            rids = sorted({s.request_index for s in chunk})
            if isinstance(result, GenerationError):
                for r in rids:
                    outcomes[r] = result
                continue
            images, denoise_s, decode_s, peak = result
            for r in rids:
                if isinstance(outcomes[r], Rendering):  # not when another chunk of it already failed
                    outcomes[r].add_stage(denoise_s, decode_s, len(chunk), peak)
            if encode:  # on the pool: overlapped with the next chunk's GPU work
                for sample, img in zip(chunk, images):
                    rendering = outcomes[sample.request_index]
                    if isinstance(rendering, Rendering):
                        rendering.encodes.append((sample.image_index, sample.seed, self._encoder.submit(
                            self._encode, img, rendering.request, sample.seed)))

    def collect(self, rendering: Rendering | GenerationError) -> Outcome:
        """Wait for a rendering's encodes (non-blocking once its `futures` are done) and build its result."""
        if isinstance(rendering, GenerationError):
            return rendering
        req, images, encode_s = rendering.request, [], 0.0
        for index, seed, fut in sorted(rendering.encodes, key=lambda t: t[0]):
            try:
                data, enc_s = fut.result()
            except Exception as err:  # noqa: BLE001 - a failed encode fails its own request only
                return self.internal_error(err)
            images.append(GeneratedImage(data=data, seed=seed, media_type=MEDIA_TYPES[req.output_format]))
            encode_s += enc_s
        timings = Timings(queue_s=rendering.queue_s, denoise_s=rendering.denoise_s, decode_s=rendering.decode_s,
                          encode_s=encode_s, total_s=time.perf_counter() - rendering.started)
        return GenerationResult(
            images=images, width=req.width, height=req.height, steps=req.steps, guidance_scale=req.guidance_scale,
            scheduler=req.scheduler, model=req.model, output_format=req.output_format, batch_size=rendering.batch,
            timings=timings, peak_vram_bytes=rendering.peak, note=self.note)

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

    # ------------------------------------------------------------------ one pipeline call
    def _run_with_oom_retry(self, key: Hashable, samples: list[Sample], cb: StepCallback | None):
        """[(samples, result or GenerationError)]. On CUDA OOM: free, split the batch in two, tile the VAE, retry once;
        a size that fit only tiled is decoded tiled from then on (no OOM and retry on every later request)."""
        import torch

        from core.memory import free_memory

        size = (key[1], key[2])
        try:
            return [(samples, self._run_chunk(key, samples, cb, force_tiling=size in self.tiled_sizes))]
        except GenerationCancelled as err:
            return [(samples, err)]
        except torch.cuda.OutOfMemoryError:
            log.warning("CUDA OOM at batch %d of %s; retrying split with VAE tiling", len(samples), key)
        except Exception as err:  # noqa: BLE001 - one bad call must not take the engine down
            return [(samples, self.internal_error(err))]
        free_memory()
        half = max(1, len(samples) // 2)
        out = []
        for part in (samples[:half], samples[half:]):
            if not part:
                continue
            try:
                out.append((part, self._run_chunk(key, part, cb, force_tiling=True)))
                self.tiled_sizes.add(size)
            except GenerationCancelled as err:
                out.append((part, err))
            except torch.cuda.OutOfMemoryError:
                free_memory()
                out.append((part, GenerationError(
                    f"out of GPU memory at {key[1]}x{key[2]} even at batch {len(part)} with VAE tiling; "
                    "use a smaller size or a lower-memory level", "oom", None)))
            except Exception as err:  # noqa: BLE001
                out.append((part, self.internal_error(err)))
        return out

    def internal_error(self, err: Exception) -> GenerationError:
        log.exception("generation failed: %s", err)
        if "CUDA error" in str(err) or "CUBLAS" in str(err):
            self.broken = f"CUDA error: {err}"  # the context is unusable; check_health makes Serve replace us
        return GenerationError(f"generation failed: {type(err).__name__}: {err}", "internal", None)

    def _run_chunk(self, key: Hashable, samples: list[Sample], cb: StepCallback | None, force_tiling=False):
        """Denoise + decode one compatible chunk. Returns (uint8 images, denoise_s, decode_s, peak bytes)."""
        import torch

        from core.fastpath import bucket_samples, shape_context
        from core.schedulers import make_scheduler

        _model, width, height, steps, scheduler, guidance = key
        run = bucket_samples(self, samples)  # padded to a compiled batch bucket (extra outputs dropped)
        pipe = copy.copy(self.pipe)  # per-call pipeline state (_guidance_scale, _interrupt, scheduler...)
        pipe.scheduler = make_scheduler(scheduler, self.base_scheduler_config)
        rids = sorted({s.request_index for s in samples})

        def on_step(p, i, t, kw):
            if cb is not None:
                cb(rids, i + 1, p.num_timesteps)  # may raise GenerationCancelled: stops at this step
            return kw

        with self.monitor.track(), shape_context(self, width, height, len(run)):
            t0 = time.perf_counter()
            latents = pipe(prompt=[s.prompt for s in run], negative_prompt=[s.negative_prompt for s in run],
                           width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
                           generator=[torch.Generator("cpu").manual_seed(s.seed) for s in run],
                           output_type="latent", callback_on_step_end=on_step).images
            self._sync()
            t1 = time.perf_counter()
            # The whole padded bucket: a compiled VAE decoder only knows the warmed bucket sizes (decoding 7 of
            # a bucket of 8 would compile a new graph mid-serving); the padding's images are dropped.
            images = self._decode(latents, force_tiling)[: len(samples)]
            t2 = time.perf_counter()
        return images, t1 - t0, t2 - t1, self.monitor.last_peak

    def _decode(self, latents, force_tiling: bool):
        from core.gpu_stage import decode_latents

        return decode_latents(self.pipe.vae, latents, force_tiling)  # on the GPU thread: never concurrent

    def _encode(self, pixels, req: GenerationRequest, seed: int) -> tuple[bytes, float]:
        from core.encoding import encode_image

        t0 = time.perf_counter()
        params = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "steps": req.steps,
                  "scheduler": req.scheduler, "guidance_scale": req.guidance_scale, "seed": seed,
                  "width": req.width, "height": req.height, "model": req.model}
        if self.note:
            params["note"] = self.note
        return encode_image(pixels, req.output_format, params), time.perf_counter() - t0

    def _sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

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
                "warmup_times": self.warmup_times}
