"""What live previews cost: denoising calls with and without previews every N steps, timed in turns (JSON).

    python -m benchmarks.preview_cost --model sdxl --width 1024 --height 1024 --steps 30 --batch 4 --every 5
    sdserve bench previews --model sdxl ...   (the same)

Runs the engine's own pipeline (the embedded full-size random-weight sd15/sdxl: speed does not depend on weight
values) with diffusers' `callback_on_step_end`, and makes a preview (core/previews.py: latents -> RGB -> JPEG,
base64) on every N-th step exactly as a job streaming previews would. Variants, interleaved round by round so
clock and thermal drift hit all alike: `none`, `latent2rgb`, and `taesd` (AutoencoderTiny; `--taesd PATH` for real
weights, default: random weights of the same architecture, same cost). Reports per-call wall time, the overhead
against `none` in percent (the issue's bar: < 3 %), and the time per preview split into GPU->RGB and JPEG encode.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from benchmarks.json_report import emit
from benchmarks.model_args import add_model_args, output_size


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def make_taesd_dir(family: str) -> str:
    """Random-weight AutoencoderTiny saved to a temp folder (the real TAESD/TAESDXL architecture)."""
    from diffusers import AutoencoderTiny

    path = tempfile.mkdtemp(prefix=f"taesd-{family}-")
    AutoencoderTiny().save_pretrained(path)
    return path


def run(model: str, width: int, height: int, steps: int, batch: int, every: int, rounds: int, taesd: str | None,
        device: str, variants: list[str]) -> dict:
    import torch

    from core.config import EngineConfig, PreviewConfig
    from core.engine import Engine
    from core.previews import PreviewMaker

    engine = Engine(EngineConfig(name=model, source=f"embedded:{model}", device=device,
                                 optimization={"warmup_steps": 0})).load()
    pipe, family = engine.pipe, engine.family
    makers = {"none": None, "latent2rgb": PreviewMaker(PreviewConfig(every_n_steps=every), family)}
    if "taesd" in variants:
        path = taesd or make_taesd_dir(family)
        makers["taesd"] = PreviewMaker(PreviewConfig(method="taesd", taesd=path, every_n_steps=every), family,
                                       engine.device, engine.dtype)
    split: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}

    def call(variant: str) -> float:
        maker = makers[variant]

        def on_step(p, i, t, kw):
            if maker is not None and maker.due(i + 1, steps):
                t0 = time.perf_counter()
                rgb = maker.rgb(kw["latents"])  # includes the device->host copy (a sync)
                t1 = time.perf_counter()
                from core.previews import encode_jpeg

                for img in rgb:
                    encode_jpeg(img, maker.config.max_side, maker.config.jpeg_quality)
                split[variant].append((t1 - t0, time.perf_counter() - t1))
            return kw

        gen = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        _sync(engine.device)
        t0 = time.perf_counter()
        pipe(prompt=["a lighthouse"] * batch, width=width, height=height, num_inference_steps=steps,
             generator=gen, output_type="latent", callback_on_step_end=on_step,
             callback_on_step_end_tensor_inputs=["latents"])
        _sync(engine.device)
        return time.perf_counter() - t0

    for v in variants:  # warm-up: kernels, TAESD load, allocator
        call(v)
    for v in variants:
        split[v].clear()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            times[v].append(call(v))
    base = statistics.median(times["none"]) if "none" in times else None
    out = {"model": model, "family": family, "device": str(engine.device), "width": width, "height": height,
           "steps": steps, "batch": batch, "every_n_steps": every, "rounds": rounds,
           "previews_per_call": len([s for s in range(1, steps + 1) if s % every == 0 and s < steps]),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "variants": {}}
    for v in variants:
        med = statistics.median(times[v])
        rec = {"call_s_median": round(med, 5), "call_s": [round(x, 5) for x in times[v]]}
        if base:
            rec["overhead_pct"] = round(100.0 * (med - base) / base, 3)
        if split[v]:
            rec["preview_rgb_ms"] = round(1000 * statistics.median(a for a, _ in split[v]), 3)
            rec["preview_jpeg_ms"] = round(1000 * statistics.median(b for _, b in split[v]), 3)
        out["variants"][v] = rec
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--every", type=int, default=5, help="a preview every N steps (previews.every_n_steps)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default="none,latent2rgb,taesd")
    p.add_argument("--taesd", default=None, help="AutoencoderTiny weights folder (default: random weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("-o", "--output", help="also write the JSON here")
    a = p.parse_args(argv)
    width, height = output_size(a)
    report = run(a.model, width, height, a.steps, a.batch, a.every, a.rounds, a.taesd, a.device,
                 [v.strip() for v in a.variants.split(",") if v.strip()])
    emit(report, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
