"""Ready time of a compiled replica: from nothing, from the local caches, from the shared compile-artifact store.

    python -m benchmarks.cold_start --family sdxl --out $OUT                       # store: a folder under /tmp
    python -m benchmarks.cold_start --family sd15 --store s3://bucket/sdserve-cache/ --out $OUT

The model is saved once as a diffusers folder (random weights, fp16) so every start loads it with the real
`from_pretrained` path. Then fresh processes start an Engine at sdserve's best settings, one per phase:
  none:   new cache_dir, new Inductor and Triton cache dirs, the store not read (compile_artifacts.read false):
          compiles everything, then uploads its artifacts to the store (what the first replica of a cluster does);
  local:  the same cache_dir and Inductor/Triton dirs as `none`, the store not read: a replica restarting on the
          node that compiled (Inductor's and Triton's own local caches);
  store:  another new cache_dir and new empty Inductor/Triton dirs (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR),
          the store read: a replica on a fresh node starting from the shared store (torch.compiler's portable
          cache artifacts, core/compile_cache.py).
Each child reports process-start-to-ready time, load / warm-up split, the artifact lookup, compile-cache counters,
Dynamo/Inductor phase times and one timed call. One JSON record: OUT/cold-start-FAMILY[-bBATCH].json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

BEST = {"attention": "sdpa", "sdpa_backend": "cudnn", "fuse_qkv": True, "channels_last": True,
        "compile": "reduce-overhead", "compile_vae": True, "warmup_steps": 2}
SIZES = {"sdxl": (1024, 1024, 30), "sd15": (512, 512, 50), "tiny-sd": (64, 64, 4)}
PHASES = ("none", "local", "store")


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
    opt = {**BEST, "compile": args.compile, "warmup_shapes": [(w, h, args.batch)], "batch_buckets": [args.batch],
           # none uploads (the first replica's job, inside its ready time); local and store only read or not at all
           "compile_artifacts": {"store": args.store, "read": args.phase == "store", "write": args.phase == "none"}}
    if args.eager:
        opt["compile"] = "none"
    if args.device == "cpu" and args.compile != "aoti":
        opt["compile"] = "none" if args.eager else "default"  # no CUDA graphs on CPU
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
    try:  # seconds per Dynamo/Inductor phase (fx_codegen_and_compile: Inductor lowering, absent on cache hits)
        from torch._dynamo.utils import compilation_time_metrics

        phases = {k: round(sum(v), 2) for k, v in compilation_time_metrics.items() if sum(v) >= 0.05}
    except Exception as err:  # noqa: BLE001 - private API, diagnostic only
        phases = repr(err)
    opts = info["optimizations"]
    return {"phase": args.phase, "family": args.family, "batch": args.batch, "ready_s": round(ready - t_proc, 2),
            "imports_s": round(t0 - t_proc, 2), "engine_load_s": info["load_s"], "load_times": info["load_times"],
            "warmup_s": info["warmup_s"], "warmup_times": info["warmup_times"],
            "compile_cache_hit": opts.get("compile_cache_hit"), "artifacts": opts.get("compile_artifacts"),
            "artifacts_saved": opts.get("compile_artifacts_saved"), "aoti": opts.get("aoti"), "counters": counters(),
            "latency_s": round(latency, 4), "ok": all(hasattr(o, "images") for o in out), "compile_times": phases,
            "load_profile": profile, "python_start_to_import_s": round(t_import - t_proc, 2)}


def run_child(args, phase: str, cache_dir: str) -> dict:
    """One fresh process; its Inductor and Triton caches live in cache_dir (a new one is a fresh node)."""
    env = dict(os.environ, SDSERVE_T0=repr(time.time()), TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_dir, "inductor"),
               TRITON_CACHE_DIR=os.path.join(cache_dir, "triton"))
    cmd = [sys.executable, "-m", "benchmarks.cold_start", "--child", "--phase", phase, "--family", args.family,
           "--folder", args.folder, "--cache-dir", cache_dir, "--store", args.store, "--batch", str(args.batch),
           "--device", args.device, "--compile", args.compile] + (["--eager"] if args.eager else []) \
        + (["--profile-load"] if args.profile_load else [])
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
    p.add_argument("--workdir", default=None, help="the phases' cache dirs (default: a new folder under /tmp)")
    p.add_argument("--store", default=None, help="compile-artifact store, an fsspec URI or folder (default: "
                   "WORKDIR/store)")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated, in order: " + ", ".join(PHASES))
    p.add_argument("--eager", action="store_true", help="no compile (CPU smoke test of the harness)")
    p.add_argument("--compile", default=BEST["compile"], choices=["reduce-overhead", "default", "cudagraphs", "aoti"],
                   help="optimization.compile of the replica (aoti: AOTInductor packages, core/aoti_unet.py)")
    p.add_argument("--profile-load", action="store_true", help="cProfile the engine load (top 60, cumulative)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase", default="", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.folder = args.folder or f"/tmp/sdserve-coldstart-{args.family}"
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    phases = args.phases.split(",")
    unknown = set(phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}; valid: {', '.join(PHASES)}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="sdserve-coldstart-")
    args.store = args.store or os.path.join(workdir, "store")
    report = {"family": args.family, "batch": args.batch, "settings": {**BEST, "compile": args.compile}, "store": args.store,
              "save_model_s": save_model(args.family, args.folder), "runs": []}
    node = os.path.join(workdir, "node-a")  # none and local share it; store gets a fresh one
    for phase in phases:
        if phase == "none":
            shutil.rmtree(node, ignore_errors=True)
        cache_dir = node if phase != "store" else tempfile.mkdtemp(prefix="node-", dir=workdir)
        report["runs"].append(run_child(args, phase, cache_dir))
        print(json.dumps({k: v for k, v in report["runs"][-1].items() if k != "load_profile"}), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"cold-start-{args.family}{'' if args.batch == 1 else f'-b{args.batch}'}"
                            f"{'' if args.compile == BEST['compile'] else '-' + args.compile}.json")
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
