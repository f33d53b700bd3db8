"""Host (Python) time per denoising step: sdserve's engine vs diffusers' own pipeline.

    PYTHONPATH=$PWD python experiments/host_overhead.py --model sdxl-shaped --steps 10 20 \
        --out benchmarks/results/host_overhead/<date>-cpu-sdxl-shaped.json
    PYTHONPATH=$PWD python experiments/host_overhead.py --model tiny-sd --profile 25   # cProfile of our loop
    # on a GPU host: real architectures, host CPU time of each side's steps
    PYTHONPATH=$PWD python experiments/host_overhead.py --model sdxl --device cuda --size 512 --steps 10 20 \
        --opt '{"fuse_qkv": true, "channels_last": true, "sdpa_backend": "cudnn"}'

Both sides generate one image (b1, euler, guidance 7.5, the same weights), taking turns, `--repeats` rounds of
N1 and N2 steps. Forward pre/post hooks on each UNet record every call's start and end; per step, "UNet" is a call's
duration and "outside" the time from its end to the next call's start (CFG combine, scheduler step, the loop, the
next call's inputs): medians over every step, in the loop thread's CPU time (headline) and in wall time. Also the
wall slope (T(N2) - T(N1)) / (N2 - N1), which counts everything per step, and `unet_bare_ms`: each UNet module
called directly with the same inputs (do our load-time optimizations change the forward's own cost?).

On the CPU (the default) with one torch thread, a tiny or narrow model's UNet call is mostly Python, so this is a
proxy for the host cost of the step loop on a GPU: `-shaped` models have the real SD1.5/SDXL UNet's blocks, layers
and attention modules (as many Python calls per forward) with narrow channels. It does not show kernel launch costs,
GPU-only code paths (cuDNN attention, channels_last copies) or host-device waits. With --device cuda, thread CPU
time is the host's work of queueing the step (kernels run asynchronously), plus any time spent spinning in a
host-device wait (a blocking copy or .item()): compare with the wall figures. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time

PROMPT = "a photo of an astronaut riding a horse on mars"


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


class UnetTimer:
    """Records when each forward call of a module starts and ends (pre/post forward hooks), on two clocks: wall time
    and the calling thread's CPU time. With one torch thread the UNet's compute runs on the calling thread too, and
    CPU time leaves out the time the thread waited for a core: on a shared box the steadier measure."""

    def __init__(self, module):
        self.starts, self.ends = [], []
        self._handles = [module.register_forward_pre_hook(lambda *_: self.starts.append(_now())),
                         module.register_forward_hook(lambda *_: self.ends.append(_now()))]

    def reset(self):
        self.starts, self.ends = [], []

    def steps(self, clock: int) -> list[tuple[float, float]]:
        """(UNet, outside) seconds of each step but the last on `clock` (0 wall, 1 thread CPU): a call's duration,
        and the time from its end to the next call's start (the CFG combine, the scheduler step, the loop, the next
        call's inputs)."""
        return [(e[clock] - s[clock], n[clock] - e[clock]) for s, e, n in zip(self.starts, self.ends, self.starts[1:])]

    def remove(self):
        for h in self._handles:
            h.remove()


# "-shaped": the real SD1.5 / SDXL UNet's blocks, layers and attention modules (so as many Python calls per forward)
# with narrow channels, on the tiny model's text encoders and VAE: a forward costs about what its Python costs.
SHAPED = {
    "sd15-shaped": ("tiny-sd", dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=8, sample_size=8)),
    "sdxl-shaped": ("tiny-sdxl", dict(
        sample_size=8, block_out_channels=(40, 80, 160), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=80, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80)),
}


def model_folder(model: str, cache_dir: str) -> str:
    from core.embedded import ensure_saved

    if model not in SHAPED:
        return str(ensure_saved(model, cache_dir))
    base, unet_kw = SHAPED[model]
    target = os.path.join(cache_dir, "embedded", f"{model}-host-overhead-v1")
    if not os.path.exists(os.path.join(target, "model_index.json")):
        import torch
        from diffusers import UNet2DConditionModel

        from core.embedded import build_pipeline

        pipe = build_pipeline(base)
        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel(**unet_kw)
        pipe.save_pretrained(target)
    return target


FULL = ("sd15", "sdxl")  # the embedded real architectures (random weights): for a GPU run (--device cuda)


def build_ours(model: str, cache_dir: str, optimization: dict, device: str = "cpu", dtype: str = "fp32"):
    from core.config import EngineConfig
    from core.engine import Engine

    source = f"embedded:{model}" if model in FULL else model_folder(model, cache_dir)
    cfg = EngineConfig(name=model.replace("-shaped", ""), source=source, device=device, dtype=dtype,
                       cache_dir=cache_dir, optimization={"warmup_steps": 0, **optimization})
    return Engine(cfg).load()


def build_diffusers(model: str, cache_dir: str, device: str = "cpu", dtype: str = "fp32"):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if model in FULL:  # built as the engine builds it (same seed: same weights)
        from core.embedded import build_pipeline

        pipe = build_pipeline(model, 0, device=device, dtype=torch_dtype).to(device)
    else:
        folder = model_folder(model, cache_dir)
        cls = StableDiffusionXLPipeline if "xl" in model else StableDiffusionPipeline
        kw = {} if "xl" in model else {"safety_checker": None, "requires_safety_checker": False}
        pipe = cls.from_pretrained(folder, torch_dtype=torch_dtype, **kw).to(device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_ours(engine, steps: int, size: int):
    from core.schemas import GenerationError, GenerationRequest

    req = GenerationRequest(prompt=PROMPT, steps=steps, width=size, height=size, guidance_scale=7.5,
                            scheduler="euler", seed=1)
    out = engine.generate([req])[0]
    if isinstance(out, GenerationError):
        raise RuntimeError(out.message)


def run_diffusers(pipe, steps: int, size: int):
    import torch

    pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, width=size, height=size,
         generator=torch.Generator("cpu").manual_seed(1), output_type="pil")


def per_step(sides: dict, steps: tuple[int, int], repeats: int) -> dict:
    """sides: name -> (generate(n_steps), UnetTimer). Per side and step, medians over every step of every run: UNet
    (a call's duration) and outside it (from one call's end to the next one's start), in thread CPU time (the
    headline: insensitive to the other processes of a shared box) and wall time; medians over steps are robust to
    interruptions, and the sides take turns (each repeat runs both) so that a slower minute of the box does not land
    on one side only. Also the slope of whole-request wall times, (T(n2) - T(n1)) / (n2 - n1), median over repeats:
    noisier, but it counts everything, e.g. work a per-request loop does only once."""
    n1, n2 = steps
    data = {name: {"slopes": [], 0: ([], []), 1: ([], [])} for name in sides}
    for fn, _ in sides.values():
        fn(n1)  # warm (first-call allocations, lazy imports)
    for _ in range(repeats):
        for name, (fn, timer) in sides.items():
            times = {}
            for n in (n1, n2):
                timer.reset()
                t0 = time.perf_counter()
                fn(n)
                times[n] = time.perf_counter() - t0
                for clock in (0, 1):
                    for u, o in timer.steps(clock):
                        data[name][clock][0].append(u)
                        data[name][clock][1].append(o)
            data[name]["slopes"].append((times[n2] - times[n1]) / (n2 - n1))

    def ms(x):
        return round(x * 1e3, 3)

    out = {}
    for name, d in data.items():
        (unet, outside), (wall_unet, wall_outside) = d[1], d[0]
        u, o, wu, wo = map(statistics.median, (unet, outside, wall_unet, wall_outside))
        out[name] = {"total_ms": ms(u + o), "unet_ms": ms(u), "outside_ms": ms(o),
                     "wall_total_ms": ms(wu + wo), "wall_unet_ms": ms(wu), "wall_outside_ms": ms(wo),
                     "wall_slope_ms": ms(statistics.median(d["slopes"])),
                     "wall_slopes_ms": [ms(t) for t in d["slopes"]], "steps_timed": len(unet)}
    return out


def bare_unet_ms(unets: dict, pipe, size: int, repeats: int, sdxl: bool) -> dict:
    """Per UNet module (name -> module), a direct call with CFG-batched inputs of this model's shapes, no loop
    around it, in thread CPU time; the modules take turns, median over repeats of 20 calls."""
    import torch

    unet = next(iter(unets.values()))
    on = {"device": unet.device, "dtype": unet.dtype}
    lat = torch.randn(2, 4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor, **on)
    t = torch.tensor([500.0, 500.0], device=unet.device)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, **on)
    kw = {}
    if sdxl:
        dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, dim, **on),
                                   "time_ids": torch.full((2, 6), float(size), **on)}
    out = {name: [] for name in unets}
    with torch.no_grad():
        for _ in range(repeats):
            for name, module in unets.items():
                t0 = time.thread_time()
                for _ in range(20):
                    module(lat, t, encoder_hidden_states=hidden, return_dict=False, **kw)
                out[name].append((time.thread_time() - t0) / 20)
                if unet.device.type == "cuda":  # (after the timing: on CUDA the host time of the launches)
                    torch.cuda.synchronize()
    return {name: round(statistics.median(v) * 1e3, 3) for name, v in out.items()}


def profile_ours(engine, steps: int, size: int, top: int) -> str:
    run_ours(engine, steps, size)
    prof = cProfile.Profile()
    loop = engine.scheduler._loop  # the denoising loop runs on the engine's GPU thread: profile it there

    def profiled():
        prof.enable()
        try:
            loop()
        finally:
            prof.disable()

    engine.scheduler._loop = profiled
    run_ours(engine, steps, size)
    engine.scheduler._loop = loop
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-sdxl", choices=["tiny-sdxl", "tiny-sd", *SHAPED, *FULL])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on cuda, else fp32")
    p.add_argument("--opt", default="{}", help="our engine's optimization fields, JSON (e.g. fuse_qkv)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, nargs=2, default=(30, 60))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=None, help="write the JSON record here")
    p.add_argument("--only", choices=["ours", "diffusers"], default=None)
    p.add_argument("--commit", default=None, help="the sdserve commit measured (default: this checkout's HEAD)")
    p.add_argument("--profile", type=int, default=0, help="cProfile one run of ours with this many steps")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from core.config import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    sdxl = "xl" in args.model
    dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    engine = build_ours(args.model, cache_dir, json.loads(args.opt), args.device, dtype)
    if args.profile:
        print(profile_ours(engine, args.profile, args.size, 40))
        return 0
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    record = {"model": args.model, "optimization": json.loads(args.opt), "size": args.size,
              "steps": list(args.steps), "threads": args.threads, "repeats": args.repeats, "scheduler": "euler",
              "guidance": 7.5, "device": device, "dtype": dtype,
              "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "commit": args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                      text=True).stdout.strip()}
    import diffusers

    record["diffusers_version"] = diffusers.__version__
    pipe = build_diffusers(args.model, cache_dir, args.device, dtype)
    sides = {}
    if args.only != "diffusers":
        sides["ours"] = (lambda n: run_ours(engine, n, args.size), UnetTimer(engine.pipe.unet))
    if args.only != "ours":
        sides["diffusers"] = (lambda n: run_diffusers(pipe, n, args.size), UnetTimer(pipe.unet))
    record.update(per_step(sides, args.steps, args.repeats))
    for _, timer in sides.values():
        timer.remove()
    record["unet_bare_ms"] = bare_unet_ms({"ours": engine.pipe.unet, "diffusers": pipe.unet}, pipe, args.size,
                                          args.repeats, sdxl)
    text = json.dumps(record, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
