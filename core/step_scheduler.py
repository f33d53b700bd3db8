"""The engine's step-level scheduler: continuous batching of mixed requests, interleaving across shapes.

One loop runs on the engine's single GPU thread (which owns the CUDA graphs) while there is work, and before
every UNet call it:

1. drops the samples of requests that were cancelled, passed their deadline or failed: they leave the batch at
   this step and never change the other samples' images (every sample has its own state);
2. admits waiting images, FIFO per group (group = model and latent shape, core/batching.group_key), while the
   group holds fewer than its cap: limits.max_batch_size, the VRAM budget's max_batch_for(width, height), and
   half the size of a call that ran out of memory (until nothing is in flight). A request's text is encoded
   once, when its first image is admitted; its images start their own schedulers and noise there.
   scheduling.admission=batch admits into a group only while it is empty: request-level batching, the baseline;
3. picks the call set for the next UNet call: a group's active samples (with the step cache on, those of one
   cache phase: full or shallow step, from each sample's own step index). Policy (core/scheduling_policy.py):
   the set with the least remaining work - fewest UNet calls until one of its samples finishes x latent pixels x
   rows per call - so a small or nearly finished request does not wait for a large one (shortest remaining
   processing time); but every group with work gets at least scheduling.min_share of the calls, or of the GPU
   time (scheduling.share_unit; costs measured per call with CUDA events, core/call_timer.py) (credit: a group
   passed over earns min_share of each call, one owed a whole call runs next), so a large request finishes within
   about its calls / min_share calls while small ones keep arriving, and a set that has not run for
   scheduling.starvation_s seconds runs first (the hard time bound). Ties go to the set with the oldest request.
   A set larger than the group's current cap (after an OOM) runs in chunks, fewest remaining steps first;
4. runs it (core/unet_step.py): one UNet call with per-sample timesteps and guidance, then every sample's own
   scheduler step. Samples that finished decode together (one VAE call), and their PNG/JPEG encoding runs on the
   engine's encoder pool while the loop goes on with the next step; the last encode of a request completes its
   outcome future.

On CUDA OOM a call is retried once in two halves (one sample: alone) and that size is decoded tiled from then on;
what still fails gets an `oom` error. Any other exception fails only the requests of that call.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Hashable

from core.admission import prepare_admitted
from core.call_timer import CallTimer
from core.denoise_state import DenoiseSample, Job, samples_of
from core.scheduling_policy import CallSet, FairShare
from core.schemas import GenerationError

log = logging.getLogger(__name__)


class StepScheduler:
    def __init__(self, engine):
        self.engine = engine
        self.cfg = engine.config.scheduling
        self._lock = threading.Lock()
        self._waiting: dict[Hashable, collections.deque[DenoiseSample]] = {}
        self._active: dict[Hashable, list[DenoiseSample]] = {}  # touched by the loop thread only
        self._running = False
        self._inputs: dict = {}  # per call-set key: the cached CallInputs
        self._caps: dict[Hashable, int] = {}
        self.oom_caps: dict[Hashable, int] = {}
        self.calls = 0
        self.batch_histogram: collections.Counter = collections.Counter()  # images per UNet call -> calls
        self.observers: list[Callable[[int], None]] = []  # called with the images of every UNet call
        self.recompiles = 0
        self.cancelled_requests = 0  # requests stopped early: cancelled (caller gone) or past their deadline
        self._graphs = None
        self.policy = FairShare(self.cfg.min_share, self.cfg.starvation_s)  # which group's set runs next
        self.timer = CallTimer()  # measured seconds per call by (group, phase): the share's costs in time

    # ------------------------------------------------------------------ submission (any thread)
    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs atomically (so requests submitted together are admitted together) and start the loop."""
        with self._lock:
            for job in jobs:
                job.samples = samples_of(job)
                job.images_left = len(job.samples)
                for s in job.samples:
                    self._waiting.setdefault(job.key, collections.deque()).append(s)
            if not self._running and jobs:
                self._running = True
                self.engine._gpu.submit(self._loop)

    def waiting_requests(self) -> int:
        with self._lock:
            return len({id(s.job) for q in self._waiting.values() for s in q if s.job.admitted is None})

    def active_images(self) -> int:
        return sum(len(v) for v in self._active.values())

    # ------------------------------------------------------------------ the loop (GPU thread)
    def _loop(self) -> None:
        try:
            self._busy_start()
            while True:
                self._drop_stopped(time.perf_counter())  # first: finished samples free their slots now
                empty = not any(self._active.values())
                with self._lock:
                    admitted = self._admit(time.perf_counter())
                    idle = not admitted and not any(self._active.values())
                    if idle:
                        self._running = False  # a later submit starts a new loop (queued behind this one)
                if idle:
                    self._busy_end()
                    return
                if empty:
                    self._fresh_start()
                self._prepare(admitted)
                self.timer.poll()  # completed calls' GPU times (non-blocking)
                choice = self._pick(time.perf_counter())
                if choice is not None:
                    self._run(*choice)
        except BaseException as err:  # noqa: BLE001 - a bug here must not leave callers waiting forever
            error = self.engine.internal_error(err)
            with self._lock:
                for s in [s for q in self._waiting.values() for s in q] + [
                        s for v in self._active.values() for s in v]:
                    s.job.fail(error)
                self._waiting.clear()
                self._active.clear()
                self._running = False
            raise

    def _busy_start(self) -> None:
        self.device = self.engine.pipe._execution_device  # (a property that walks the components: once)
        self.timer.use_cuda = self.device.type == "cuda"  # CUDA events on the engine's device, else perf_counter

    def _fresh_start(self) -> None:
        """Admitting into an empty batch starts a new run: step-cache counters, OOM caps and cached inputs start
        afresh (a caller that waits for its result and submits again always gets a new run, whether or not the
        loop exited meanwhile; the counters stay readable until then)."""
        self.oom_caps.clear()
        self._inputs.clear()
        if self.engine.step_cache is not None:
            self.engine.step_cache.reset()

    def _busy_end(self) -> None:
        pipe = self.engine.pipe
        if getattr(pipe, "_all_hooks", None):  # model CPU offload: offload everything, re-arm its hooks
            pipe.maybe_free_model_hooks()

    def cap(self, key: Hashable) -> int:
        if key not in self._caps:
            self._caps[key] = max(1, self.engine.max_batch_for(key[1], key[2]))
        return min(self._caps[key], self.oom_caps.get(key, self._caps[key]))

    def _admit(self, now: float) -> list[DenoiseSample]:
        admitted = []
        for key in list(self._waiting):
            queue, active = self._waiting[key], self._active.setdefault(key, [])
            for s in list(queue):  # requests cancelled or past their deadline while waiting get their outcome now
                reason = None if s.job.finished else s.job.stop_reason(now)
                self._stop_early(s.job, reason)
                if s.job.finished:
                    queue.remove(s)
            if self.cfg.admission == "batch" and active:
                continue
            limit = self._caps.get(key) or self.cap(key)  # the budget's cap (OOM caps chunk calls instead)
            while queue and len(active) < limit:
                s = queue.popleft()
                active.append(s)
                admitted.append(s)
            if not queue:
                del self._waiting[key]
        return admitted

    def _prepare(self, admitted: list[DenoiseSample]) -> None:
        if admitted:  # (most steps admit nothing)
            prepare_admitted(self, admitted)

    def _drop_stopped(self, now: float) -> None:
        for key, active in self._active.items():
            keep = []
            for s in active:
                reason = None if s.job.finished else s.job.stop_reason(now)
                self._stop_early(s.job, reason)
                if not s.job.finished and s.latents is not None:
                    keep.append(s)
            active[:] = keep

    def _stop_early(self, job: Job, reason: GenerationError | None) -> None:
        """Fail a job that must stop (reason) and count every request stopped before its end once: cancelled or
        past its deadline here, or its future cancelled by the task awaiting it (a Serve caller that went away)."""
        if reason is not None:
            job.fail(reason)
        if not job.stopped_early and (reason is not None or job.future.cancelled()):
            job.stopped_early = True
            self.cancelled_requests += 1

    def share_unit(self) -> str:
        """calls or time (scheduling.share_unit; auto: time for a compiled UNet, whose calls are GPU-bound)."""
        unit = self.cfg.share_unit
        return unit if unit != "auto" else ("time" if getattr(self.engine, "compiled", False) else "calls")

    def _pick(self, now: float):
        hook = self.engine.step_cache
        in_time = self.share_unit() == "time"
        sets = []
        for key, active in self._active.items():
            if not active:
                continue
            if hook is None:
                parts = [(None, active)]
            else:
                full = [s for s in active if hook.is_full_step(s.step - s.first_step)]
                shallow = [s for s in active if not hook.is_full_step(s.step - s.first_step)]
                parts = [(True, full), (False, shallow)]
            for phase, members in parts:
                if members:
                    units = key[1] * key[2] * (len(members) + sum(1 for s in members if s.cfg))  # pixels x rows
                    cost = self.timer.estimate((key, phase), units) if in_time else 1.0
                    sets.append(CallSet(key, min(s.remaining for s in members) * units,
                                        min(s.job.submitted for s in members), min(s.last_run for s in members),
                                        (key, phase, members), cost))
        if not sets:
            return None
        key, phase, members = self.policy.pick(sets, now).payload
        if self.engine.lora is not None:  # at most gpu_slots distinct adapter sets per call
            members = self.engine.lora.limit_sets(members)
        cap = self.cap(key)
        if len(members) > cap:
            members = sorted(members, key=lambda s: s.remaining)[:cap]
        return key, phase, members

    # ------------------------------------------------------------------ one UNet call
    def _run(self, key, phase, samples: list[DenoiseSample]) -> None:
        import torch

        from core.memory import free_memory

        try:
            self._call(key, phase, samples)
            return
        except torch.cuda.OutOfMemoryError:
            log.warning("CUDA OOM in a UNet call of %d images at %s; retrying split", len(samples), key)
        except Exception as err:  # noqa: BLE001 - one bad call must not take the engine down
            self._fail(samples, self.engine.internal_error(err))
            return
        free_memory()
        self.oom_caps[key] = max(1, len(samples) // 2)
        half = max(1, len(samples) // 2)
        for part in (samples[:half], samples[half:]):
            if not part:
                continue
            try:
                self._call(key, phase, part)
                self.engine.tiled_sizes.add((key[1], key[2]))
            except Exception as err:  # noqa: BLE001
                free_memory()
                self._fail(part, self._error(err, key[1], key[2], len(part)))

    def _call(self, key, phase, samples: list[DenoiseSample]) -> None:
        from core.fastpath import padded, row_buckets, shape_context
        from core.unet_step import build_inputs, denoise_step, unet_rows

        eng = self.engine
        inputs = self._inputs[(key, phase)] = build_inputs(samples, self.device, self._inputs.get((key, phase)))
        rows = padded(eng, unet_rows(samples), row_buckets(eng) if getattr(eng, "compiled", False) else None)
        if eng.lora is not None:
            eng.lora.prepare_call(samples, rows)  # each sample's adapter set -> its rows' slot
        # ControlNet residuals change the compiled UNet's inputs: their calls run eagerly (never recompile)
        part = "unet-control" if eng.controlnets and any(s.controls for s in samples) else "unet"
        units = key[1] * key[2] * (len(samples) + sum(1 for s in samples if s.cfg))
        with eng.monitor.track(), shape_context(eng, part, key[1], key[2], rows), self.timer.measure((key, phase),
                                                                                                    units):
            denoise_step(eng, samples, inputs, rows, phase)
        self._after_call(key, samples)

    def _after_call(self, key, samples: list[DenoiseSample]) -> None:
        now = time.perf_counter()
        n, peak = len(samples), self.engine.monitor.last_peak
        self.calls += 1
        self.batch_histogram[n] += 1
        for observe in self.observers:
            observe(n)
        self._check_recompiles()
        jobs = {}
        for s in samples:
            s.last_run = now
            job = jobs.setdefault(id(s.job), s.job)
            job.batch = max(job.batch, n)
            job.calls_done += 1
            job.denoise_end = now
            if peak is not None:
                job.peak = max(job.peak or 0, peak)
        for job in jobs.values():
            self._report(job)
        finished = [s for s in samples if s.done and not s.job.finished]
        if finished:
            self._decode(key, finished)

    def _report(self, job: Job) -> None:
        step = job.calls_done // job.request.num_images
        if job.on_progress is None or step <= job.reported:
            job.reported = max(job.reported, step)
            return
        job.reported = step

        def latents():
            import torch

            return torch.cat([s.latents for s in job.samples if s.latents is not None]).detach().cpu()

        try:
            job.on_progress(step, job.calls_total, latents)
        except GenerationError as err:  # GenerationCancelled from a step callback: this request stops here
            job.fail(err)
        except Exception as err:  # noqa: BLE001 - a broken callback fails its own request only
            job.fail(self.engine.internal_error(err))

    def _decode(self, key, samples: list[DenoiseSample]) -> None:
        """VAE-decode samples that finished at this step, together; then hand them to the encoder pool."""
        import torch

        from core.fastpath import padded, shape_context
        from core.memory import free_memory
        from core.unet_step import pad_rows

        eng, size = self.engine, (key[1], key[2])
        t0 = time.perf_counter()
        images, failed = [], None
        for attempt, parts in enumerate(([samples], _halves(samples))):
            try:
                images = []
                for part in parts:
                    latents = torch.cat([s.latents for s in part])
                    n = padded(eng, len(part))
                    with eng.monitor.track(), shape_context(eng, "vae", key[1], key[2], n):
                        images += eng._decode(pad_rows(latents, n), attempt > 0 or size in eng.tiled_sizes)[
                            :len(part)]
                if attempt:
                    eng.tiled_sizes.add(size)
                failed = None
                break
            except torch.cuda.OutOfMemoryError as err:
                log.warning("CUDA OOM decoding %d images at %s%s", len(samples), size,
                            "" if attempt else "; retrying split and tiled")
                free_memory()
                failed = err
            except Exception as err:  # noqa: BLE001
                failed = err
                break
        if failed is not None:
            self._fail(samples, self._error(failed, key[1], key[2], len(samples)))
            return
        decode_s = time.perf_counter() - t0
        for job in {id(s.job): s.job for s in samples}.values():
            job.decode_s += decode_s
        for s, pixels in zip(samples, images):
            self.engine.finish_image(s, pixels)
            s.latents, s.step_kwargs = None, {}  # leaves the batch (frees its latents and its noise drawn ahead)

    # ------------------------------------------------------------------ helpers
    def _fail(self, samples: list[DenoiseSample], err: GenerationError) -> None:
        for s in samples:
            s.job.fail(err)

    def _error(self, err: Exception, width: int, height: int, batch: int) -> GenerationError:
        import torch

        if isinstance(err, GenerationError):
            return err
        if isinstance(err, torch.cuda.OutOfMemoryError):
            return GenerationError(f"out of GPU memory at {width}x{height} even at batch {batch} with VAE tiling; "
                                   "use a smaller size or a lower-memory level", "oom", None)
        return self.engine.internal_error(err)

    def _check_recompiles(self) -> None:
        """A compiled engine must not compile while serving (a multi-second stall): count and warn."""
        if not getattr(self.engine, "compiled", False):
            return
        graphs = unique_graphs()
        if self._graphs is not None and graphs > self._graphs and not getattr(self.engine, "_warming", False):
            self.recompiles += graphs - self._graphs
            log.warning("torch.compile compiled %d new graph(s) while serving (%d so far): a stall; warm up "
                        "this shape or batch bucket", graphs - self._graphs, self.recompiles)
        self._graphs = graphs

    def mark_warm(self) -> None:
        """End of warm-up: graphs compiled from now on are recompiles."""
        self._graphs = unique_graphs()


def _halves(samples: list) -> list[list]:
    half = max(1, len(samples) // 2)
    return [p for p in (samples[:half], samples[half:]) if p]


def unique_graphs() -> int:
    """Graphs Dynamo compiled in this process so far (torch._dynamo.utils.counters)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - private API; without it recompiles go uncounted
        return 0
    return int(counters["stats"].get("unique_graphs", 0))
