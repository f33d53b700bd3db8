"""Where does the step loop wait for the GPU? Runs the engine (eager, SD1.5 architecture by default) on mixed
requests with torch.cuda.set_sync_debug_mode("warn") and records the stack of every synchronizing call made on the
GPU thread after warm-up, grouped by call site; also times uniform vs mixed batches of 8.

    python3 experiments/sync_probe.py --source embedded:sd15 --out $OUT/syncs.json
    python3 experiments/sync_probe.py --before ...   (diffusers' own step noise and UniPC: the waits as they were)
"""
from __future__ import annotations

import argparse
import collections
import json
import time
import traceback
import warnings


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="embedded:sd15")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    p.add_argument("--before", action="store_true", help="per-step noise draws and diffusers' UniPC (before/after)")
    args = p.parse_args()
    import torch

    if args.before:
        import core.ahead_noise
        import core.unipc_sync_free

        core.ahead_noise.step_generator = lambda generator, sample: generator
        core.unipc_sync_free.sync_free = lambda device: False

    from core.config import EngineConfig
    from core.engine import Engine
    from core.schemas import GenerationRequest

    cfg = EngineConfig(name="m", source=args.source, device=args.device, dtype="fp16" if args.device != "cpu" else "fp32",
                       limits={"max_batch_size": 8})
    engine = Engine(cfg).load()
    cuda = args.device != "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    size = 512 if "sd15" in args.source else 64
    scheds = ["euler", "euler_a", "dpmpp_2m_karras", "unipc"]

    def reqs(name: str):
        mixed = name != "uniform"
        return [GenerationRequest(prompt=f"p{i}", seed=i, width=size, height=size,
                                  steps=args.steps + (5 * (i % 4) if name == "mixed" else 0),
                                  guidance_scale=(5.0 + i % 4) if mixed else 7.0,
                                  scheduler=scheds[i % 4] if mixed else "euler") for i in range(8)]

    def timed(batch):
        sync()
        t0 = time.perf_counter()
        out = engine.generate(batch)
        sync()
        return time.perf_counter() - t0, out

    engine.generate(reqs("uniform"))
    engine.generate(reqs("mixed"))
    timing = {}
    # mixed_same_steps: schedulers and guidance differ, step counts do not (no batch tail: the scheduler math alone)
    for name in ("uniform", "mixed", "mixed_same_steps"):
        runs = [timed(reqs(name)) for _ in range(3)]
        steps = sum(r.steps for r in reqs(name))
        best = min(r[0] for r in runs)
        timing[name] = {"s": round(best, 4), "image_steps": steps, "image_steps_per_s": round(steps / best, 1),
                        "batch_sizes": sorted({getattr(o, "batch_size", None) for o in runs[0][1]})}
    for sched in scheds:  # one image alone: where the host's per-step work shows most
        one = [GenerationRequest(prompt="p", seed=1, width=size, height=size, steps=args.steps, guidance_scale=7.0,
                                 scheduler=sched)]
        timing[f"b1_{sched}_s"] = round(min(timed(one)[0] for _ in range(3)), 4)
    sites: collections.Counter = collections.Counter()
    examples: dict = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        stack = [f for f in traceback.extract_stack()[:-1]
                 if "/core/" in f.filename or "diffusers" in f.filename or "/torch/" in f.filename]
        key = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}:{f.name}" for f in stack[-4:][::-1])
        sites[key] += 1
        examples.setdefault(key, str(message)[:200])

    warnings.showwarning = record
    warnings.simplefilter("always")
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        engine.generate(reqs("mixed"))
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    report = {"gpu": torch.cuda.get_device_name() if cuda else None, "source": args.source, "before": args.before,
              "timing": timing,
              "syncs_in_one_mixed_batch": sum(sites.values()),
              "sites": [{"count": c, "site": k, "message": examples[k]} for k, c in sites.most_common(40)]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        open(args.out, "w").write(text)


if __name__ == "__main__":
    main()
