"""Preparing the images the step scheduler (core/step_scheduler.py) has just admitted: init images (img2img,
inpainting), each request's text conditioning at its first admitted image, then every image's own start (its
scheduler, generator and initial latents: core/denoise_state.start_sample). Runs on the engine's GPU thread."""
from __future__ import annotations

import contextlib
import time

from core.denoise_state import DenoiseSample, encode_text, start_sample, uses_cfg
from core.device_copy import uploads_without_host_wait
from core.img2img import encode_images
from core.prompt_length import prompt_note


def prepare_admitted(scheduler, admitted: list[DenoiseSample]) -> None:
    """Prepare `admitted`; what fails fails its own request only (the others go on)."""
    eng = scheduler.engine
    with_images = {id(s.job): s.job for s in admitted if s.job.images is not None and not s.job.finished}
    if with_images:  # init images of every admitted request: one VAE encoder call per size (or cache hits)
        try:
            encode_images(eng, [j.images for j in with_images.values()], scheduler.device)
        except Exception as err:  # noqa: BLE001 - fails these requests only
            scheduler._fail([s for s in admitted if id(s.job) in with_images], scheduler._error(err, 0, 0, 1))
    # diffusers' text encoding and SDXL's time ids copy host tensors to the GPU from pageable memory, which makes
    # the host wait for the running batch's queued steps: queued from pinned memory here
    with uploads_without_host_wait(scheduler.device):
        for s in admitted:
            job = s.job
            if job.finished:
                continue
            try:
                _prepare_sample(eng, s, scheduler.device)
            except Exception as err:  # noqa: BLE001 - fails this request only
                job.fail(scheduler._error(err, job.request.width, job.request.height, 1))


def _prepare_sample(eng, s: DenoiseSample, device) -> None:
    """The job's text conditioning (at its first admitted image), then the image's own start."""
    job = s.job
    if job.conditioning is None:
        job.admitted = time.perf_counter()
        # with the job's text-encoder LoRAs, if any (their embeddings skip the prompt cache)
        with eng.lora.text_encoding(job) if eng.lora is not None else contextlib.nullcontext():
            if eng.prompt_encoder is not None:  # opt-in weighting + long prompts (compel)
                job.conditioning, job.prompt_note = eng.prompt_encoder.encode(
                    job.request, device, uses_cfg(eng.pipe, job.request.guidance_scale))
            else:
                cache = eng.caches.prompt_embeddings
                if eng.lora is not None and eng.lora.text_adapters(job):
                    cache = None
                job.conditioning = encode_text(eng.pipe, eng.family, job.request, device, cache)
                # Here, on the GPU thread: a fast tokenizer is not thread-safe (each call sets its padding and
                # truncation on the shared backend), so it is only ever called from here.
                job.prompt_note = prompt_note(eng.pipe, job.request, eng.config.name)
    start_sample(s, eng.pipe, eng.family, eng.base_scheduler_config, device, job.conditioning.cond.dtype, eng)
    if not job.calls_total:
        job.calls_total = s.calls
