"""Cold start vs warm-cache start of a compiled replica (issue 6: "ready in <= 20 s for SDXL against a warm cache").

    python -m benchmarks.cold_start --family sdxl --out $OUT

The model is saved once as a diffusers folder (random weights, fp16) so every start loads it with the real
`from_pretrained` path. Then fresh processes start an Engine at sdserve's best settings:
  1. cold:  empty cache dir -> compiles and writes the compile cache;
  2. warm:  same cache dir  -> what a replica on a machine sharing the cache dir sees;
  3. warm again, with only the mega-cache file (Inductor's local dir wiped) -> a new machine with the cache volume
     holding just cache_dir/compile (when --mega-only).
Each child reports process-start-to-ready time, load / warm-up split, compile-cache counters and one timed call.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

BEST = {"attention": "sdpa", "sdpa_backend": "cudnn", "fuse_qkv": True, "channels_last": True,
        "compile": "reduce-overhead", "compile_vae": True, "warmup_steps": 2}
SIZES = {"sdxl": (1024, 1024, 30), "sd15": (512, 512, 50), "tiny-sd": (64, 64, 4)}


def save_model(family: str, folder: str) -> float:
    if os.path.exists(os.path.join(folder, "model_index.json")):
        return 0.0
    import torch

    from core.embedded import build_pipeline

    t = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = build_pipeline(family, 0, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
    pipe.save_pretrained(folder, safe_serialization=True)
    return time.perf_counter() - t


def child(args) -> dict:
    t_proc = float(os.environ["SDSERVE_T0"])
    t_import = time.time()
    from core.compile_cache import counters
    from core.config import EngineConfig
    from core.engine import Engine
    from core.schemas import GenerationRequest

    w, h, steps = SIZES[args.family]
    opt = {**BEST, "warmup_shapes": [(w, h, args.batch)], "batch_buckets": [args.batch]}
    if args.eager:
        opt["compile"] = "none"
    if args.aot:
        opt["compile_artifacts"] = "aot"
    cfg = EngineConfig(name=args.family, source=args.folder, cache_dir=args.cache_dir, scheduler="euler",
                       dtype="fp16" if args.device != "cpu" else "fp32", device=args.device, optimization=opt,
                       limits={"max_batch_size": args.batch, "max_steps": 150})
    t0 = time.time()
    profile = None
    if args.profile_load:  # where the load's seconds go (reading, optimizing, placing): top entries by cumulative
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
    engine = Engine(cfg).load()
    ready = time.time()
    if args.profile_load:
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(60)
        profile = buf.getvalue()[-12000:]
    req = [GenerationRequest(prompt="a cat", width=w, height=h, steps=steps, seed=i) for i in range(args.batch)]
    engine.generate(req)
    t1 = time.perf_counter()
    out = engine.generate(req)
    latency = time.perf_counter() - t1
    info = engine.info()
    try:
        from torch._dynamo.utils import compile_times

        phases = compile_times(repr="str", aggregate=True)
    except Exception as err:  # noqa: BLE001 - private API, diagnostic only
        phases = repr(err)
    return {"phase": args.phase, "family": args.family, "batch": args.batch, "ready_s": round(ready - t_proc, 2),
            "imports_s": round(t0 - t_proc, 2), "engine_load_s": info["load_s"], "load_times": info["load_times"],
            "warmup_s": info["warmup_s"],
            "warmup_times": info["warmup_times"], "compile_cache_hit": info["optimizations"].get("compile_cache_hit"),
            "counters": counters(), "latency_s": round(latency, 4),
            "ok": all(hasattr(o, "images") for o in out), "compile_times": phases, "load_profile": profile,
            "python_start_to_import_s": round(t_import - t_proc, 2)}


def run_child(args, phase: str) -> dict:
    env = dict(os.environ, SDSERVE_T0=repr(time.time()))
    cache_dir = args.cache_dir
    if phase.endswith("-pc"):  # Dynamo's experimental "caching precompile": the cache also holds traced bytecode
        env["TORCH_CACHING_PRECOMPILE"] = "1"
        cache_dir += "-pc"
    cmd = [sys.executable, "-m", "benchmarks.cold_start", "--child", "--phase", phase, "--family", args.family,
           "--folder", args.folder, "--cache-dir", cache_dir, "--batch", str(args.batch), "--device",
           args.device] + (["--eager"] if args.eager else []) + (["--profile-load"] if args.profile_load else []) \
        + (["--aot"] if args.aot else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"phase": phase, "error": proc.stderr[-3000:]}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="sdxl", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--folder", default=None, help="where the random-weight model is saved (default under /tmp)")
    p.add_argument("--cache-dir", default="/tmp/sdserve-coldstart-cache")
    p.add_argument("--phases", default="cold,warm", help="cold,warm[,mega-only][,cold-pc,warm-pc]: -pc runs use "
                   "TORCH_CACHING_PRECOMPILE=1 and their own cache dir")
    p.add_argument("--eager", action="store_true", help="no compile (CPU smoke test)")
    p.add_argument("--profile-load", action="store_true", help="cProfile the engine load (top 60, cumulative)")
    p.add_argument("--aot", action="store_true", help="optimization.compile_artifacts=aot (no Dynamo at warm starts)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.folder = args.folder or f"/tmp/sdserve-coldstart-{args.family}"
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    report = {"family": args.family, "batch": args.batch, "settings": BEST, "save_model_s": save_model(
        args.family, args.folder), "runs": []}
    for phase in args.phases.split(","):
        if phase in ("cold", "cold-pc"):
            shutil.rmtree(args.cache_dir + phase[4:], ignore_errors=True)
        if phase == "mega-only":
            shutil.rmtree(os.path.join(args.cache_dir, "inductor"), ignore_errors=True)
        report["runs"].append(run_child(args, phase))
        print(json.dumps(report["runs"][-1]), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"cold-start-{args.family}.json")
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
