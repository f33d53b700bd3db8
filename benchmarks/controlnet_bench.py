"""Image-input benchmark (issue 19): ControlNet latency and peak VRAM beside diffusers, and img2img's cost.

    python -m benchmarks.controlnet_bench --model sdxl --size 1024 --steps 30 --levels none,balanced --out DIR
    python -m benchmarks.controlnet_bench --model tiny-sdxl --size 64 --steps 2 --device cpu   (CPU smoke run)

One process, on the real SDXL (or SD1.5) architecture with random weights (speed and memory do not depend on weight
values), eager fp16 on both sides:
- diffusers: StableDiffusion(XL)ControlNetPipeline with one ControlNet, all on the GPU (`diffusers`) and with
  `enable_model_cpu_offload()` (`diffusers-offload`, diffusers' own answer to a small GPU);
- sdserve at each memory level (--levels): text-to-image, the same request with one ControlNet (the same weights,
  saved with save_pretrained and loaded from that folder through the config's `controlnets` like a real one),
  and img2img at --strength (it runs int(steps x strength) steps: about that share of the text-to-image time).
Each variant: one untimed call, then --repeats timed ones (median); peak VRAM = torch.cuda.max_memory_allocated
over the timed calls. One JSON record per variant in <out>/<date>-<device>-controlnet.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import io
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench.controlnet")
GiB = 1024**3
PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed"
FAMILY = {"sdxl": "sdxl", "tiny-sdxl": "sdxl", "sd15": "sd15", "tiny-sd": "sd15"}


def _sync_reset(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / GiB if device.startswith("cuda") else None


def timed(fn, repeats: int, device: str) -> dict:
    """One untimed call, then `repeats` timed ones: median/min seconds and the peak VRAM of the timed calls."""
    import torch

    fn()
    _sync_reset(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"latency_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "peak_vram_gib": None if (p := _peak_gib(device)) is None else round(p, 3), "repeats": repeats}


def control_image(size: int):
    """A deterministic edge-like map (white lines on black), as a PIL image and PNG bytes."""
    import numpy as np
    from PIL import Image

    arr = np.zeros((size, size, 3), np.uint8)
    step = max(size // 16, 4)
    arr[::step, :, :] = 255
    arr[:, ::step, :] = 255
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return img, buf.getvalue()


def init_image_png(size: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bench_diffusers(model: str, size: int, steps: int, repeats: int, device: str, dtype, cn_dir: Path,
                    records: list) -> None:
    """diffusers' ControlNet pipeline over the same architecture, all on the device and with model offload."""
    import torch
    from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline,
                           StableDiffusionXLControlNetPipeline)

    from core.embedded import build_pipeline

    base = build_pipeline(model, device=device, dtype=dtype)
    net = ControlNetModel.from_pretrained(cn_dir, torch_dtype=dtype).to(device)
    cls = StableDiffusionXLControlNetPipeline if FAMILY[model] == "sdxl" else StableDiffusionControlNetPipeline
    parts = {k: v for k, v in base.components.items() if k in cls._get_signature_keys(cls)[0]}
    pipe = cls(**{**parts, "controlnet": net})
    pipe.set_progress_bar_config(disable=True)
    img, _ = control_image(size)

    def call():
        with torch.no_grad():
            pipe(PROMPT, image=img, width=size, height=size, num_inference_steps=steps,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="pil")

    _sync_reset(device)
    records.append({"variant": "diffusers", "task": "controlnet", **timed(call, repeats, device)})
    log.info("%s", records[-1])
    if device.startswith("cuda"):
        pipe.to("cpu")
        _sync_reset(device)
        pipe.enable_model_cpu_offload(device=device)
        records.append({"variant": "diffusers-offload", "task": "controlnet",
                        **timed(call, max(1, repeats - 1), device)})
        log.info("%s", records[-1])
    del pipe, base, net
    _sync_reset(device)


def bench_sdserve(model: str, size: int, steps: int, strength: float, repeats: int, device: str, level: str,
                  cn_dir: Path, records: list) -> None:
    from core.config import EngineConfig
    from core.engine import Engine
    from core.schemas import GenerationRequest

    cfg = EngineConfig(name=model, source=f"embedded:{model}", device=device,
                       dtype="fp16" if device.startswith("cuda") else "fp32",
                       memory={"level": level}, limits={"max_width": max(size, 1024), "max_height": max(size, 1024)},
                       controlnets=[{"name": "bench", "source": str(cn_dir)}])
    engine = Engine(cfg).load()
    _, cn_png = control_image(size)
    common = {"prompt": PROMPT, "width": size, "height": size, "steps": steps, "seed": 0, "output_format": "png"}
    tasks = {
        "txt2img": GenerationRequest(**common),
        "controlnet": GenerationRequest(**common, control=[{"model": "bench", "image": cn_png}]),
        f"img2img-{strength}": GenerationRequest(**common, init_image=init_image_png(size), strength=strength),
    }
    for task, req in tasks.items():
        def call(req=req):
            out = engine.generate([req])[0]
            if isinstance(out, Exception):
                raise out
            return out

        _sync_reset(device)
        records.append({"variant": f"sdserve-{level}", "task": task, **timed(call, repeats, device)})
        log.info("%s", records[-1])
    del engine
    _sync_reset(device)


def add_ratios(records: list) -> None:
    by = {(r["variant"], r["task"]): r for r in records if "latency_s" in r}
    for r in records:
        txt = by.get((r["variant"], "txt2img"))
        if txt and r is not txt and "latency_s" in r:
            r["vs_txt2img"] = round(r["latency_s"] / txt["latency_s"], 3)
        ref = by.get(("diffusers", "controlnet"))
        if ref and r["task"] == "controlnet" and r is not ref and "latency_s" in r:
            r["vs_diffusers"] = round(r["latency_s"] / ref["latency_s"], 3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sdxl", choices=sorted(FAMILY))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--strength", type=float, default=0.6)
    ap.add_argument("--levels", default="none,balanced", help="comma list of sdserve memory levels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch
    from diffusers import ControlNetModel

    from core.embedded import build_pipeline

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    records: list = []
    info = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "model": args.model, "size": args.size, "steps": args.steps,
            "note": "random weights: speed and memory only"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{dt.date.today()}-{info['device'].replace(' ', '-')}-controlnet.json"
    with tempfile.TemporaryDirectory(prefix="cn-bench-") as tmp:
        cn_dir = Path(tmp) / "controlnet"
        # The ControlNet of this architecture (diffusers' from_unet: the UNet's encoder half + zero convs), saved
        # once; both sides load the same folder.
        ControlNetModel.from_unet(build_pipeline(args.model, device=args.device, dtype=dtype).unet).save_pretrained(
            cn_dir, safe_serialization=True)
        _sync_reset(args.device)
        steps = [] if args.no_diffusers else [lambda: bench_diffusers(args.model, args.size, args.steps,
                                                                      args.repeats, args.device, dtype, cn_dir,
                                                                      records)]
        steps += [lambda lv=lv: bench_sdserve(args.model, args.size, args.steps, args.strength, args.repeats,
                                              args.device, lv, cn_dir, records)
                  for lv in args.levels.split(",") if lv]
        for step in steps:
            try:
                step()
            except Exception as err:  # noqa: BLE001 - keep what was measured; the record says what failed
                log.exception("variant failed")
                records.append({"error": f"{type(err).__name__}: {err}"[:500]})
            add_ratios(records)
            path.write_text(json.dumps({"bench": "controlnet", **info, "records": records}, indent=2) + "\n")
    print(json.dumps(records, indent=2))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
