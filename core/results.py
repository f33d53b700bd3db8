"""Building a request's result on the engine's encoder threads: paste-back of inpainted images, image encoding
with the generation parameters embedded, and the GenerationResult once every image of the request is encoded."""
from __future__ import annotations

import time

from core.schemas import MEDIA_TYPES, GeneratedImage, GenerationResult, Timings


def encode_result_image(engine, pixels, job, seed: int) -> tuple[bytes, float]:
    """One decoded image (HxWx3 uint8) -> encoded bytes, and the seconds it took (encoder thread; on a GPU they
    include waiting for the decoded pixels' copy to the host, which the GPU thread queued without waiting)."""
    from core.encoding import encode_image
    from core.img2img import paste_back

    from core.device_copy import host_array

    t0 = time.perf_counter()
    req = job.request
    pixels = paste_back(host_array(pixels), job.images)  # inpainting: the init image's pixels outside the blurred mask
    params = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "steps": req.steps,
              "scheduler": req.scheduler, "guidance_scale": req.guidance_scale, "seed": seed,
              "width": req.width, "height": req.height, "model": req.model}
    if job.images is not None:
        params["denoising_strength"] = job.images.strength
    if engine.note:
        params["note"] = engine.note
    return encode_image(pixels, req.output_format, params), time.perf_counter() - t0


def maybe_complete(engine, job) -> None:
    """On an encoder thread: once every image of the job is encoded, build its result."""
    if job.finished or len(job.encodes) < job.request.num_images or not all(f.done() for *_, f in job.encodes):
        return
    req, images, encode_s = job.request, [], 0.0
    for index, seed, fut in sorted(job.encodes, key=lambda t: t[0]):
        try:
            data, enc_s = fut.result()
        except Exception as err:  # noqa: BLE001 - a failed encode fails its own request only
            job.fail(engine.internal_error(err))
            return
        images.append(GeneratedImage(data=data, seed=seed, media_type=MEDIA_TYPES[req.output_format]))
        encode_s += enc_s
    admitted = job.admitted or job.submitted
    timings = Timings(queue_s=admitted - job.submitted + job.extra_queue_s,
                      denoise_s=max(0.0, job.denoise_end - admitted), decode_s=job.decode_s, encode_s=encode_s,
                      total_s=time.perf_counter() - job.submitted)
    steps_run = None
    if job.images is not None:
        from core.img2img import steps_run as run_steps

        steps_run = run_steps(req.steps, job.images.strength)
    job.settle(GenerationResult(
        images=images, width=req.width, height=req.height, steps=req.steps, steps_run=steps_run,
        guidance_scale=req.guidance_scale, scheduler=req.scheduler, model=req.model,
        output_format=req.output_format, batch_size=max(1, job.batch), timings=timings, peak_vram_bytes=job.peak,
        note="; ".join(n for n in (engine.note, job.prompt_note) if n) or None))
