"""Per-request and per-image denoising state for the step-level scheduler (core/step_scheduler.py).

A request of n images is one `Job` and n `DenoiseSample`s (image i uses seed + i). Each sample carries everything
that makes its image depend on its own request only: its own diffusers scheduler instance (timesteps, sigmas,
multistep history), its own CPU generator (initial noise and ancestral noise), its latents, its guidance and its
step index. The job carries what is per request: the text conditioning (encoded once, at admission), the progress
callback, the cancel flag and deadline, and the outcome future.

The preparation reproduces diffusers' StableDiffusion(XL)Pipeline.__call__ (0.42): encode_prompt per request,
randn_tensor(shape, generator) * init_noise_sigma on the sample's CPU generator, SDXL's pooled embeddings and
add_time_ids (original = target = the image size, crop (0, 0)), set_begin_index(0) for SDXL, eta=0 and the
generator passed to step() where the scheduler takes them.
"""
from __future__ import annotations

import inspect
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable

from core.batching import group_key, image_seed
from core.schemas import GenerationError, GenerationRequest

# on_progress(step, total, latents): after each UNet call that advanced the request. `latents()` returns a CPU
# copy of the request's current latents (for live previews); call it only inside the callback (GPU thread).
ProgressCallback = Callable[[int, int, Callable[[], Any]], None]


@dataclass
class TextConditioning:
    """One request's text conditioning, shared by its images (rows of shape [1, ...])."""

    cond: Any
    uncond: Any | None  # None: no classifier-free guidance
    cond_pooled: Any | None = None  # SDXL
    uncond_pooled: Any | None = None
    time_ids: Any | None = None  # SDXL add_time_ids, the same for the cond and uncond rows
    timestep_cond: Any | None = None  # guidance-distilled UNets (time_cond_proj_dim): guidance embedding


@dataclass(eq=False)
class Job:
    """One request inside the engine, from submission to its outcome (`future`: GenerationResult or
    GenerationError, never an exception)."""

    request: GenerationRequest  # resolved (no None fields)
    index: int = 0  # position in a sync generate() call (its step_callback reports it)
    on_progress: ProgressCallback | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.perf_counter() value
    extra_queue_s: float = 0.0  # queueing before the engine (e.g. in a server), added to queue_s
    encode: bool = True  # False for warm-up calls: no image encoding
    submitted: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    # filled by the scheduler
    admitted: float | None = None
    conditioning: TextConditioning | None = None
    images: Any = None  # core.img2img.ImageConditioning of an img2img/inpainting request (set at resolve)
    controls: list = field(default_factory=list)  # core.controlnet.ControlSpec per control[i] (set at resolve)
    prompt_note: str | None = None  # the prompt is longer than the text encoder reads (set with conditioning)
    images_left: int = 0  # samples not yet decoded
    denoise_end: float = 0.0
    decode_s: float = 0.0
    batch: int = 0  # most images that shared a UNet call with one of this job's images
    peak: int | None = None
    calls_done: int = 0  # UNet calls done, summed over its samples (progress)
    calls_total: int = 0
    reported: int = 0
    stopped_early: bool = False  # counted in the scheduler's cancelled_requests
    samples: list = field(default_factory=list)  # its DenoiseSamples (set at submission)
    encodes: list = field(default_factory=list)  # (image index, seed, Future[(bytes, seconds)])
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def key(self):
        return group_key(self.request)

    @property
    def finished(self) -> bool:
        return self.future.done()

    def settle(self, outcome) -> bool:
        """Set this job's outcome (the first one wins; a future cancelled by an awaiting task stays cancelled)."""
        with self.lock:
            if self.future.done():
                return False
            try:
                self.future.set_result(outcome)
            except InvalidStateError:  # cancelled meanwhile (asyncio.wrap_future cancels it with its task)
                return False
            return True

    def fail(self, err: GenerationError) -> None:
        """Fail this request with `err`; its samples leave the batch at the next step."""
        self.settle(err)

    def stop_reason(self, now: float) -> GenerationError | None:
        """Why this job must stop now (cancelled, past its deadline), or None."""
        if self.cancel.is_set():
            what = "cancelled"
        elif self.deadline is not None and now > self.deadline:
            what = "deadline exceeded"
        else:
            return None  # (the common case, for every sample before every step: nothing formatted)
        from core.schemas import GenerationCancelled

        # UNet calls (heun: 2 per step)
        return GenerationCancelled(f"{what} at step {self.reported}/{self.calls_total or self.request.steps}")


@dataclass(eq=False)
class DenoiseSample:
    """One image being denoised."""

    job: Job
    image_index: int
    seed: int
    scheduler: Any = None
    generator: Any = None
    timesteps: Any = None  # float32 copy of scheduler.timesteps, on the device (the UNet's per-sample timestep)
    latents: Any = None  # [1, C, h, w]
    step: int = 0  # index into timesteps of the next UNet call (heun/kdpm2: two per denoising step)
    first_step: int = 0  # img2img: where the sample entered its schedule (t_start x order); 0 for text-to-image
    image: Any = None  # core.img2img.ImageSample: img2img/inpainting state (and a 9-channel UNet's extra input)
    controls: list = field(default_factory=list)  # core.controlnet.ControlUnit per ControlNet conditioning
    step_kwargs: dict = field(default_factory=dict)
    deep: Any = None  # step cache: this sample's rows of the cached deep feature ([cond(, uncond)])
    last_run: float = 0.0

    @property
    def guidance(self) -> float:
        return float(self.job.request.guidance_scale)

    @property
    def cfg(self) -> bool:
        return self.job.conditioning.uncond is not None

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def calls(self) -> int:
        """UNet calls this sample has to make in all (img2img: the schedule's last ones)."""
        return self.total - self.first_step

    @property
    def remaining(self) -> int:
        return self.total - self.step

    @property
    def done(self) -> bool:
        return self.step >= self.total


def samples_of(job: Job) -> list[DenoiseSample]:
    req = job.request
    return [DenoiseSample(job, i, image_seed(req, i)) for i in range(req.num_images)]


def uses_cfg(pipe, guidance: float) -> bool:
    """As the pipelines' do_classifier_free_guidance."""
    return guidance > 1 and pipe.unet.config.time_cond_proj_dim is None


def encode_text(pipe, family: str, req: GenerationRequest, device, cache=None) -> TextConditioning:
    """The request's text conditioning, as the pipeline's __call__ prepares it (batch of one prompt).

    cache: a core.caches.LRUCache of the text encoders' outputs by (prompt, negative prompt, CFG on/off); the
    per-request parts (SDXL's size time ids, a guidance embedding) are computed here every time."""
    import torch

    cfg = uses_cfg(pipe, req.guidance_scale)
    negative = req.negative_prompt or ""
    key = (req.prompt, negative, cfg)
    encoded = cache.get(key) if cache is not None else None
    with torch.no_grad():
        if encoded is None:
            if family == "sdxl":
                encoded = pipe.encode_prompt(prompt=req.prompt, device=device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=cfg, negative_prompt=negative)
            else:
                encoded = pipe.encode_prompt(req.prompt, device, 1, cfg, negative)
            encoded = tuple(t.to(device) if (t is not None and i % 2 == 0) or cfg else None
                            for i, t in enumerate(encoded))  # the negative parts only with CFG
            if cache is not None:
                cache.put(key, encoded)
        if family == "sdxl":
            pe, npe, pooled, npooled = encoded
            te2 = getattr(pipe, "text_encoder_2", None)
            proj = int(pooled.shape[-1]) if te2 is None else te2.config.projection_dim
            time_ids = pipe._get_add_time_ids((req.height, req.width), (0, 0), (req.height, req.width),
                                              dtype=pe.dtype, text_encoder_projection_dim=proj).to(device)
            out = TextConditioning(pe, npe, pooled, npooled, time_ids)
        else:
            pe, npe = encoded
            out = TextConditioning(pe, npe)
        proj_dim = pipe.unet.config.time_cond_proj_dim
        if proj_dim is not None:
            w = torch.tensor([req.guidance_scale - 1.0])
            out.timestep_cond = pipe.get_guidance_scale_embedding(w, embedding_dim=proj_dim).to(
                device=device, dtype=pe.dtype)
    return out


_STEP_PARAMS: dict[type, set[str]] = {}


def step_kwargs(scheduler, generator) -> dict:
    """The pipeline's prepare_extra_step_kwargs(generator, eta=0.0) for this scheduler."""
    params = _STEP_PARAMS.get(type(scheduler))
    if params is None:
        params = _STEP_PARAMS[type(scheduler)] = set(inspect.signature(scheduler.step).parameters)
    out = {}
    if "eta" in params:
        out["eta"] = 0.0
    if "generator" in params:
        out["generator"] = generator
    return out


def initial_latents(generator, shape: tuple, device, dtype, init_noise_sigma):
    """prepare_latents for one image: noise from the image's own CPU generator, scaled for its scheduler."""
    from diffusers.utils.torch_utils import randn_tensor

    from core.device_copy import to_device

    # drawn on the CPU as randn_tensor does for a CPU generator; copied without making the host wait for the GPU
    return to_device(randn_tensor(shape, generator=generator, device="cpu", dtype=dtype), device) * init_noise_sigma


def start_sample(sample: DenoiseSample, pipe, family: str, base_scheduler_config, device, dtype,
                 engine=None) -> None:
    """Scheduler, timesteps, generator and initial latents of one image (the job's text is encoded first, its
    init image too: core/img2img.py starts img2img/inpainting samples and those of 9-channel UNets)."""
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    from core.schedulers import make_scheduler

    from core.device_copy import to_device

    req = sample.job.request
    sched = make_scheduler(req.scheduler, base_scheduler_config)
    # The schedule stays on the host. diffusers' set_timesteps(device=cuda) copies numpy arrays to the GPU from
    # pageable memory and (euler, heun, kdpm2, dpm singlestep) copies sigmas back with .to("cpu"): each copy waits
    # for all the GPU work queued before it, i.e. every admitted image drained the running batch's queue. With the
    # timesteps and sigmas on the CPU, the schedulers' per-step math reads them as host scalars (no wait, also not
    # at the first step's index_for_timestep nor in DDIM's alphas_cumprod[t]); the UNet's per-sample timestep
    # input is the one copy to the device, from pinned memory. All 18 schedulers run so against device latents
    # without a host wait (tests/core/test_schedule_on_host.py, on the meta device, where any wait raises).
    timesteps, _ = retrieve_timesteps(sched, req.steps, "cpu")
    if family == "sdxl" and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    sample.scheduler = sched
    sample.timesteps = to_device(timesteps.to(torch.float32), device)
    sample.generator = torch.Generator("cpu").manual_seed(sample.seed)
    from core.ahead_noise import step_generator

    sample.step_kwargs = step_kwargs(sched, step_generator(sample.generator, sample))  # noise drawn ahead, no sync
    vsf = pipe.vae_scale_factor
    shape = (1, pipe.vae.config.latent_channels, req.height // vsf, req.width // vsf)
    if sample.job.images is not None or pipe.unet.config.in_channels != shape[1]:
        from core.img2img import start

        start(sample, pipe, engine, shape, device, dtype)
    else:
        sample.latents = initial_latents(sample.generator, shape, device, dtype, sched.init_noise_sigma)
    if sample.job.controls:
        from core.controlnet import start

        start(sample, sample.job.controls, device, dtype)
    sample.last_run = time.perf_counter()
