"""Quality and speed of the optimization presets: each preset's images vs `exact`'s (PSNR, SSIM) on the same prompts
and seeds, and each preset's latency beside compiled diffusers.

    python -m benchmarks.preset_quality --workload sdxl-1024-30 --out $OUT          # GPU
    python -m benchmarks.preset_quality --workload tiny-64-4 --device cpu --override '{"compile": "none"}'  # smoke

Every preset runs in a fresh process (as a replica would: its own compile), making one image per prompt (seed = the
prompt's index, so every preset gets the same noise), then timing `--batch` images in one call. `exact` is the
reference; the record says what each preset applied (e.g. fp8 is ignored without FP8 tensor cores). With random
weights (embedded models) the images are noise: PSNR/SSIM then say how far a preset moves the pixels, a proxy for
its quality cost, not the cost itself on a trained model. One JSON record: OUT/preset-quality-WORKLOAD.json.
A shared --cache-dir keeps the presets' compile artifacts (core/compile_cache.py): a later call with other --presets
recompiles nothing it compiled before (`exact` is rerun every time, as the reference).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.gpu_bench import WORKLOADS

PROMPTS = ("a photo of an astronaut riding a horse on mars, highly detailed",
           "a watercolor painting of a lighthouse at dusk", "a close-up portrait of an old fisherman, 85mm",
           "an isometric pixel-art city at night with neon signs", "a bowl of ramen on a wooden table, top view",
           "a snowy mountain range under the northern lights", "a red vintage car parked in a narrow street",
           "a macro photo of a dragonfly on a leaf with dew drops")
PRESETS = ("exact", "fast", "fastest")


def psnr(a, b) -> float | None:
    """dB over 8-bit pixels; None when the images are identical."""
    import numpy as np

    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return round(10 * float(np.log10(255**2 / mse)), 2) if mse else None


def ssim(a, b) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) of two HxWx3 uint8
    images, averaged over the colour channels."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(a).double().permute(2, 0, 1)[None]
    y = torch.from_numpy(b).double().permute(2, 0, 1)[None]
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5**2))
    g = (g / g.sum())
    win = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)

    def blur(t):
        return F.conv2d(t, win, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return round(float(s.mean()), 5)


def child(args) -> dict:
    import torch

    from core.config import EngineConfig
    from core.engine import Engine
    from core.schemas import GenerationRequest

    family, w, h, steps, _ = WORKLOADS[args.workload]
    opt = {"warmup_shapes": [(w, h, args.batch)], "warmup_steps": 2, **json.loads(args.override or "{}")}
    cfg = EngineConfig(name=family, source=args.source or f"embedded:{family}", preset=args.preset,
                       device=args.device, cache_dir=args.cache_dir, optimization=opt, scheduler="euler",
                       limits={"max_batch_size": max(args.batch, 1)})
    t0 = time.perf_counter()
    engine = Engine(cfg).load()
    ready_s = time.perf_counter() - t0
    folder = os.path.join(args.workdir, args.preset)
    os.makedirs(folder, exist_ok=True)
    for i, prompt in enumerate(PROMPTS[:args.prompts]):
        out = engine.generate([GenerationRequest(prompt=prompt, width=w, height=h, steps=steps, seed=i,
                                                 guidance_scale=7.0)])[0]
        with open(os.path.join(folder, f"{i}.png"), "wb") as fh:
            fh.write(out.images[0].data)
    batch = [GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], width=w, height=h, steps=steps, seed=i,
                               guidance_scale=7.0) for i in range(args.batch)]
    times = []
    for _ in range(args.repeats + 1):  # the first call is not timed (allocator, lazy init)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        engine.generate(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    latency = statistics.median(times[1:])
    applied = {k: v for k, v in engine.applied.items() if k in ("compile", "fp8", "fp8_layers", "step_cache",
                                                                 "fuse_qkv", "channels_last", "attention")}
    return {"preset": args.preset, "optimization": cfg.optimization.model_dump(mode="json", exclude={
        "compile_artifacts"}), "applied": applied, "ready_s": round(ready_s, 2), "batch": args.batch,
        "latency_s": round(latency, 4), "img_per_s": round(args.batch / latency, 3)}


def diffusers_compile(args) -> dict:
    """Compiled diffusers at the same workload and batch (benchmarks.gpu_bench's diffusers-compile variant)."""
    from benchmarks.gpu_bench import bench_diffusers, env_info

    records: list = []
    bench_diffusers(args.workload, ["diffusers-compile"], [args.batch], args.repeats, env_info(), None, records,
                    count=False)
    r = records[0]
    return {"preset": "diffusers-compile", "batch": r["batch"], "latency_s": r["latency_s"],
            "img_per_s": r["img_per_s"], "settings": r["settings"]}


def run_child(args, name: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.preset_quality", "--_child", name, "--workload", args.workload,
           "--device", args.device, "--batch", str(args.batch), "--repeats", str(args.repeats), "--prompts",
           str(args.prompts), "--workdir", args.workdir, "--cache-dir", args.cache_dir] \
        + (["--override", args.override] if args.override else []) \
        + (["--source", args.source] if args.source else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"preset": name, "error": proc.stderr[-3000:]}
    return json.loads(lines[-1])


def compare(workdir: str, preset: str, prompts: int) -> dict:
    """PSNR / SSIM of a preset's images vs exact's, per prompt and their means."""
    import numpy as np
    from PIL import Image

    def load(name, i):
        return np.asarray(Image.open(os.path.join(workdir, name, f"{i}.png")).convert("RGB"))

    per = [(psnr(load("exact", i), load(preset, i)), ssim(load("exact", i), load(preset, i)))
           for i in range(prompts)]
    finite = [p for p, _ in per if p is not None]
    return {"psnr_db": round(statistics.mean(finite), 2) if finite else None,  # None: identical images
            "psnr_db_min": min(finite) if finite else None, "identical_images": sum(p is None for p, _ in per),
            "ssim": round(statistics.mean(s for _, s in per), 5), "ssim_min": min(s for _, s in per)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="sdxl-1024-30", choices=sorted(WORKLOADS))
    p.add_argument("--presets", default=",".join(PRESETS), help="comma list; exact is always run (the reference)")
    p.add_argument("--prompts", type=int, default=8, help=f"images compared per preset (1-{len(PROMPTS)})")
    p.add_argument("--batch", type=int, default=1, help="images per timed call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls (median)")
    p.add_argument("--device", default="auto")
    p.add_argument("--source", default=None, help="model source (hub id, folder, .safetensors) of the workload's "
                   "family: real weights give a real quality figure (default: the embedded random-weight model)")
    p.add_argument("--override", default=None, help="JSON optimization fields over every preset's, e.g. "
                   "'{\"compile\": \"none\"}' (CPU smoke test)")
    p.add_argument("--diffusers-compile", choices=("auto", "on", "off"), default="auto",
                   help="also time compiled diffusers (auto: on CUDA)")
    p.add_argument("--workdir", default=None, help="images per preset (default: a new folder under /tmp)")
    p.add_argument("--cache-dir", default=None, help="engine cache_dir (default: WORKDIR/cache)")
    p.add_argument("--out", default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must be 1-{len(PROMPTS)}")
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="sdserve-presets-")
    args.cache_dir = args.cache_dir or os.path.join(args.workdir, "cache")
    if args._child:
        args.preset = args._child
        out = diffusers_compile(args) if args._child == "diffusers-compile" else child(args)
        print(json.dumps(out), flush=True)
        return 0
    presets = ["exact"] + [x for x in args.presets.split(",") if x and x != "exact"]
    unknown = set(presets) - set(PRESETS)
    if unknown:
        p.error(f"unknown presets {sorted(unknown)}; valid: {', '.join(PRESETS)}")
    runs = [run_child(args, name) for name in presets]
    exact = runs[0]
    for run in runs:
        if "error" not in run and "error" not in exact:
            run["quality_vs_exact"] = compare(args.workdir, run["preset"], args.prompts)
            run["speed_vs_exact"] = round(exact["latency_s"] / run["latency_s"], 3)
        print(json.dumps(run), flush=True)
    want_diffusers = args.diffusers_compile == "on" or (args.diffusers_compile == "auto" and args.device != "cpu"
                                                       and _cuda())
    if want_diffusers:
        base = run_child(args, "diffusers-compile")
        runs.append(base)
        print(json.dumps(base), flush=True)
        if "error" not in base:
            for run in runs[:-1]:
                if "latency_s" in run:
                    run["speed_vs_diffusers_compile"] = round(base["latency_s"] / run["latency_s"], 3)
    report = {"workload": args.workload, "source": args.source or "embedded (random weights)",
              "prompts": args.prompts, "seeds": list(range(args.prompts)),
              "override": json.loads(args.override or "{}"), "workdir": args.workdir, "runs": runs,
              "note": "PSNR/SSIM vs the exact preset's images (same prompts and seeds); with random-weight "
                      "(embedded) models the images are noise: a proxy for the quality cost, not the cost itself"}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"preset-quality-{args.workload}.json"), "w") as fh:
            json.dump(report, fh, indent=1)
    return 0 if all("error" not in r for r in runs) else 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
