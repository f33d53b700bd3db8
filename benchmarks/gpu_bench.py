"""GPU benchmark: plain diffusers (eager, compiled) vs sdserve, side by side in one process.

    python -m benchmarks.gpu_bench --workloads sd15-512-50,sdxl-1024-30 --out benchmarks/results

Records (one per workload x variant x batch) go to <out>/<date>-<device>.json; docs/benchmarks.md is rendered
from them by benchmarks/render.py. Random weights: speed and memory do not depend on weight values.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import statistics
import time

from benchmarks.image_quality import image_quality, load_reference, save_reference
from benchmarks.memory_variant import MemoryVariant, parse_variants

log = logging.getLogger("bench")
GiB = 1024**3
WORKLOADS = {  # name: (family, width, height, steps, throughput batches)
    "sd15-512-50": ("sd15", 512, 512, 50, (1, 8, 16)),
    "sdxl-1024-30": ("sdxl", 1024, 1024, 30, (1, 4, 8)),
    "sdxl-512-30": ("sdxl", 512, 512, 30, (1, 4, 8)),  # the small shape of the mixed-shapes load (host-bound eager)
    "tiny-64-4": ("tiny-sd", 64, 64, 4, (1, 4)),  # CPU smoke test of the harness itself
}
PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed"
NEGATIVE = "blurry, low quality"


def env_info() -> dict:
    import diffusers
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"device": dev, "torch": torch.__version__, "diffusers": diffusers.__version__}


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peaks() -> tuple[float | None, float | None]:
    import torch

    if not torch.cuda.is_available():
        return None, None
    return torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB


def held() -> tuple[float, float]:
    """(allocated, reserved) GiB held right now, after freeing the cache: what engines kept alive for the interleaved
    timing occupy, subtracted from the next engine's peaks."""
    import torch

    reset_peak()
    if not torch.cuda.is_available():
        return 0.0, 0.0
    return torch.cuda.memory_allocated() / GiB, torch.cuda.memory_reserved() / GiB


def interleave(calls: list, rounds: int) -> list[list[float]]:
    """Latency of each call per round, the calls taking turns (round-robin): host-paced eager runs on the GPU host
    drift by up to ±30% between minutes, so ratios between levels are read within a round, not across runs."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for i, fn in enumerate(calls):
            times[i].append(timed(fn)[0])
    return times


def add_interleaved(recs: list[dict], times: list[list[float]]) -> None:
    """Per record: its median interleaved latency and the median of its per-round ratio to the first record's
    (the first memory level run: NONE). A streamed level can be no faster than its copies (copy_bound_s) nor than
    the resident run: `interleaved_vs_bound` reads it against the larger of the two, per round."""
    for rec, ts in zip(recs, times):
        rec["interleaved_s"] = round(statistics.median(ts), 4)
        rec["interleaved_vs_first"] = round(statistics.median(t / t0 for t, t0 in zip(ts, times[0])), 3)
        rec["interleaved_rounds"] = len(ts)
        rec["interleaved_times_s"] = [round(t, 4) for t in ts]
        if rec.get("copy_bound_s"):
            rec["interleaved_vs_bound"] = round(statistics.median(
                t / max(t0, rec["copy_bound_s"]) for t, t0 in zip(ts, times[0])), 3)


def measure_matmul_tflops() -> float | None:
    """Measured dense bf16 matmul rate on this GPU (the MFU denominator)."""
    import torch

    if not torch.cuda.is_available():
        return None
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    reps = 50
    for _ in range(reps):
        a @ b
    end.record()
    sync()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def measure_h2d_gbps() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    out = {}
    for pinned in (True, False):
        host = torch.empty(1 * GiB, dtype=torch.uint8, pin_memory=pinned)
        dev = torch.empty_like(host, device="cuda")
        dev.copy_(host)
        sync()
        t = time.perf_counter()
        for _ in range(5):
            dev.copy_(host, non_blocking=pinned)
        sync()
        out["pinned" if pinned else "pageable"] = 5 * GiB / (time.perf_counter() - t) / 1e9
        del host, dev
    return out


def count_flops(pipe, w: int, h: int, steps: int, batch: int) -> int:
    """FLOPs of one full call: F(1 step) + (steps-1) x (F(2) - F(1)) from torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    def one(n):
        with FlopCounterMode(display=False) as fc:
            run_diffusers(pipe, w, h, n, batch)
        return fc.get_total_flops()

    f1, f2 = one(1), one(2)
    return f1 + (steps - 1) * (f2 - f1)


def run_diffusers(pipe, w, h, steps, batch):
    import torch

    gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
    return pipe(prompt=[PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, width=w, height=h,
                num_inference_steps=steps, guidance_scale=7.0, generator=gens).images


def timed(fn) -> tuple[float, object]:
    """(seconds, result) of one call, the GPU drained before and after."""
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def time_calls(fn, repeats: int, keep: list | None = None) -> tuple[float, float, float | None, float | None]:
    """(median latency, first call latency, peak alloc GiB, peak reserved GiB); the last call's result is
    appended to `keep` (no extra call just to collect images)."""
    reset_peak()
    first, out = timed(fn)
    lat = []
    for _ in range(repeats):
        t, out = timed(fn)
        lat.append(t)
    alloc, reserved = peaks()
    if keep is not None:
        keep.append(out)
    return statistics.median(lat), first, alloc, reserved


def record(workload, variant, batch, latency, first, alloc, reserved, flops, peak_tflops, info, settings, **extra):
    achieved = flops / latency / 1e12 if flops else None
    return {"workload": workload, "variant": variant, "batch": batch, "latency_s": round(latency, 4),
            "img_per_s": round(batch / latency, 3), "peak_vram_gib": alloc and round(alloc, 3),
            "peak_reserved_gib": reserved and round(reserved, 3), "warmup_s": round(first, 2),
            "tflops_per_call": flops and round(flops / 1e12, 2), "achieved_tflops": achieved and round(achieved, 1),
            "mfu": (achieved / peak_tflops) if achieved and peak_tflops else None, **info, "settings": settings,
            **extra}


def bench_diffusers(workload, variants, batches, repeats, info, peak_tflops, records, count=True,
                    compile_batches=None):
    import torch

    from core.embedded import build_pipeline

    if not count and not {"diffusers-eager", "diffusers-offload", "diffusers-compile"} & set(variants):
        return {b: None for b in batches}  # nothing to count or run: no pipeline to build (SDXL: ~10 s)
    family, w, h, steps, _ = WORKLOADS[workload]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = build_pipeline(family, 0, device=device, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    flops = {b: count_flops(pipe, w, h, steps, b) if count else None for b in batches}
    if "diffusers-eager" in variants:
        for b in batches:
            lat, first, a, r = time_calls(lambda: run_diffusers(pipe, w, h, steps, b), repeats)
            records.append(record(workload, "diffusers-eager", b, lat, first, a, r, flops[b], peak_tflops, info,
                                  {"dtype": str(dtype), "attention": "sdpa"}))
            log.info("%s", records[-1])
    if "diffusers-offload" in variants and device == "cuda":
        pipe.to("cpu")
        pipe.enable_model_cpu_offload()
        lat, first, a, r = time_calls(lambda: run_diffusers(pipe, w, h, steps, 1), repeats)
        records.append(record(workload, "diffusers-model-cpu-offload", 1, lat, first, a, r, flops[1], peak_tflops,
                              info, {"dtype": str(dtype)}, memory_level="diffusers-model-cpu-offload"))
        log.info("%s", records[-1])
        pipe.remove_all_hooks()
        pipe.to(device)
    if "diffusers-compile" in variants:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
        for b in compile_batches or batches:
            lat, first, a, r = time_calls(lambda: run_diffusers(pipe, w, h, steps, b), repeats)
            records.append(record(workload, "diffusers-compile", b, lat, first, a, r, flops[b], peak_tflops, info,
                                  {"dtype": str(dtype), "compile": "reduce-overhead", "channels_last": True}))
            log.info("%s", records[-1])
    del pipe
    torch._dynamo.reset()
    reset_peak()
    return flops


def profile_call(fn, path: str) -> dict:
    """torch.profiler over one call: top CUDA kernels, and how busy the GPU was over the call's wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sync()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    wall = time.perf_counter() - t
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    syncs = {e.key: e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                         "cudaMemcpyAsync", "cudaEventSynchronize")}
    with open(path, "w") as fh:
        fh.write(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
        fh.write("\n\nHost side, by self CPU time:\n")
        fh.write(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
    # (the profiler's own overhead stretches the wall time a little: busy is a lower bound)
    return {"wall_s": round(wall, 4), "gpu_kernel_s": round(kernel_us / 1e6, 4),
            "gpu_busy": round(kernel_us / 1e6 / wall, 3), "host_sync_calls": syncs, "table": os.path.basename(path),
            **gpu_idle_gaps(prof.events())}


def gpu_idle_gaps(events) -> dict:
    """Where the GPU sat idle between its first and last kernel: total idle time and the gaps over 20 us
    (host-bound stretches show as many small gaps, a sync as one long one per step)."""
    import torch

    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return {}
    gaps, end = [], spans[0][1]
    for start, stop in spans[1:]:
        if start > end:
            gaps.append(start - end)
        end = max(end, stop)
    big = sorted((g for g in gaps if g > 20), reverse=True)
    return {"gpu_span_s": round((end - spans[0][0]) / 1e6, 4), "gpu_idle_s": round(sum(gaps) / 1e6, 4),
            "gpu_gaps_over_20us": len(big), "gpu_gaps_over_20us_s": round(sum(big) / 1e6, 4),
            "gpu_longest_gaps_us": [round(g) for g in big[:8]]}


def bench_sdserve(workload, variant, settings, batches, repeats, info, peak_tflops, flops, records, cache_dir,
                  memory: MemoryVariant | None = None, reference=None, profile_dir=None, pinned_gbps=None,
                  vram_budget_gib=None, keep: list | None = None) -> dict[int, list[bytes]]:
    """Records one entry per batch; returns the last call's encoded images per batch. With `reference` (those
    of another variant), each record gets a `quality` figure against it. With `keep`, the engine stays alive and
    (its last record, its batch-1 call) is appended for the interleaved timing; peaks exclude what was held before."""
    import torch

    from core.config import EngineConfig
    from core.engine import Engine
    from core.schemas import GenerationRequest

    family, w, h, steps, _ = WORKLOADS[workload]
    memory = memory or MemoryVariant()
    source = f"embedded:{family}"
    settings = dict(settings)
    dtype = settings.pop("dtype", "auto")
    cfg = EngineConfig(name=family, source=source, cache_dir=cache_dir, scheduler="euler", dtype=dtype,
                       optimization={**settings, "warmup_shapes": [(w, h, max(batches))],
                                     "batch_buckets": list(batches)},
                       memory=memory.memory_config(vram_budget_gib),
                       limits={"max_batch_size": max(batches), "max_steps": 150})
    base_alloc, base_reserved = held()
    t = time.perf_counter()
    engine = Engine(cfg).load()
    ready_s = time.perf_counter() - t

    def call(b):
        reqs = [GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=w, height=h, steps=steps,
                                  guidance_scale=7.0, seed=i) for i in range(b)]
        outs = engine.generate(reqs)
        bad = [o for o in outs if not hasattr(o, "images")]
        if bad:
            raise RuntimeError(f"sdserve call failed: {bad[0]}")
        return outs

    images = {}
    for b in batches:
        kept: list = []
        copied = streamed_bytes(engine)
        lat, first, a, r = time_calls(lambda: call(b), repeats, kept)
        a, r = a and a - base_alloc, r and r - base_reserved
        copied = (streamed_bytes(engine) - copied) / (repeats + 1)  # per call, over the timed calls
        outs = kept[0]
        images[b] = [img.data for o in outs for img in o.images]
        stages = {"denoise_s": round(outs[0].timings.denoise_s, 4), "decode_s": round(outs[0].timings.decode_s, 4),
                  "encode_s": round(statistics.mean(o.timings.encode_s for o in outs), 4)}
        bound = copy_bound(engine, steps, pinned_gbps, copied)
        extra = {"quality": image_quality(reference[b], images[b])} if reference and b in reference else {}
        if profile_dir:
            name = f"profile-{workload}{'' if variant == 'sdserve' else '-' + variant}-b{b}.txt"
            extra["profile"] = profile_call(lambda: call(b), os.path.join(profile_dir, name))
        records.append(record(workload, variant, b, lat, first, a, r, flops.get(b), peak_tflops, info,
                              {**settings, "dtype": dtype, "memory_level": engine.level.value,
                               "memory_offload": memory.offload, "streamed_share": memory.streamed_share,
                               "fp8_storage": engine.applied.get("fp8_storage"), "stream_lookahead": memory.lookahead,
                               "vram_budget_gib": vram_budget_gib},
                              ready_s=round(ready_s, 1),
                              memory_level=engine.level.value, stages=stages, **bound, **extra))
        log.info("%s", records[-1])
    if keep is not None:
        keep.append((records[-1], lambda: call(1)))
        return images
    del engine
    torch._dynamo.reset()
    reset_peak()
    return images


SDSERVE_BEST = {"attention": "sdpa", "sdpa_backend": "cudnn", "fuse_qkv": True, "channels_last": True,
                "compile": "reduce-overhead", "compile_vae": True, "warmup_steps": 2}


def streamed_bytes(engine) -> int:
    """Bytes the engine's weight streamers (offload=stream) have copied in so far."""
    return sum(st.copied_bytes for st in getattr(engine, "streamers", []))


def copy_bound(engine, steps: int, pinned_gbps: float | None, copied_per_call: float) -> dict:
    """Streamed offload copies weights in every call: the call cannot be faster than those bytes over the measured
    pinned H2D bandwidth (issue 7). offload=stream counts what its streamers copied per timed call; the other
    strategies are estimated (every UNet weight once per step, the text encoders once)."""
    from core.memory import STREAMED_STRATEGIES, footprint_of, offload_strategy

    strategy = offload_strategy(engine.level, engine.config.memory.offload)
    if not pinned_gbps or strategy not in STREAMED_STRATEGIES:
        return {}
    if strategy == "stream":
        streamed = copied_per_call
    else:
        fp = footprint_of(engine.pipe)
        streamed = fp.unet * steps + fp.text_encoders
    return {"streamed_gib_per_call": round(streamed / GiB, 2), "copy_bound_s": round(streamed / pinned_gbps / 1e9, 3)}


def auto_choices(workload, budgets_gib, info) -> list[dict]:
    """What AUTO picks for each VRAM budget, from the real architecture's footprint (issue 7)."""
    import torch

    from core.embedded import build_pipeline
    from core.memory import estimate_peak_bytes, footprint_of, pick_level

    family, w, h, *_ = WORKLOADS[workload]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = build_pipeline(family, 0, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
    fp = footprint_of(pipe)
    del pipe
    reset_peak()
    out = []
    for b in budgets_gib:
        level = pick_level(fp, family, int(b * GiB), w, h)
        out.append({"workload": workload, "variant": "auto-choice", "batch": 1, "budget_gib": b,
                    "memory_level": level.value, "latency_s": None, "img_per_s": None, "peak_vram_gib": None,
                    "estimate_gib": round(estimate_peak_bytes(fp, family, level, w, h, 1) / GiB, 2), **info})
        log.info("%s", out[-1])
    return out


def add_ratios(records):
    base = {(r["workload"], r["batch"], r["variant"]): r["latency_s"] for r in records}
    for r in records:
        if not r.get("latency_s"):
            continue
        for ref in ("diffusers-eager", "diffusers-compile", "sdserve"):
            v = base.get((r["workload"], r["batch"], ref))
            if v:
                r[f"speedup_vs_{ref}"] = round(v / r["latency_s"], 3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workloads", default="sd15-512-50,sdxl-1024-30")
    p.add_argument("--variants", default="diffusers-eager,diffusers-compile,sdserve",
                   help="also: sdserve-deepcache (step caching; its records carry `quality` vs sdserve's images)")
    p.add_argument("--deepcache-interval", default="3",
                   help="step_cache interval(s) of sdserve-deepcache, e.g. 3 or 3,5 (then sdserve-deepcache-i5 too)")
    p.add_argument("--batches", default="", help="comma list; default: the workload's list")
    p.add_argument("--compile-batches", default="", help="batches for diffusers-compile (default: --batches); "
                   "each costs a full compile")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sdserve-settings", default="", help="JSON overriding SDSERVE_BEST")
    p.add_argument("--extra-sdserve", default="", help="JSON dict name -> settings for extra sdserve variants")
    p.add_argument("--memory-levels", default="",
                   help="comma list of memory variants to run at batch 1, NONE first, in the short form "
                   "level[:offload[:share[:fp8|fp16[:lookahead]]]] (benchmarks/memory_variant.py), e.g. "
                   "balanced:group-block, balanced:stream:0.6, aggressive:::fp8, aggressive::::6; then all of "
                   "them again in turns (interleaved_vs_first)")
    p.add_argument("--memory-variants", default="",
                   help="more memory variants as a JSON list of MemoryVariant objects, run after --memory-levels, "
                   "e.g. '[{\"level\": \"balanced\", \"offload\": \"stream\", \"streamed_share\": 0.3}]'")
    p.add_argument("--vram-budget-gib", type=float, default=None,
                   help="memory-level runs: enforce this VRAM budget (set_per_process_memory_fraction caps the "
                   "reserved memory too)")
    p.add_argument("--rounds", type=int, default=0, help="rounds of the in-turns timing (default: repeats + 1)")
    p.add_argument("--auto-budgets", default="", help="comma list of GiB budgets: record AUTO's level choice")
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over one sdserve call per batch: <out>/profile-<workload>-b<N>.txt")
    p.add_argument("--cache-dir", default=os.environ.get("SDSERVE_CACHE_DIR", "/tmp/sdserve-cache"))
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--reference-dir", default=None, help="where the sdserve variant's images are kept for the "
                   "quality figures of later runs (default <cache-dir>/bench-reference; also copied to <out>/reference)")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    memory_variants = parse_variants(args.memory_levels, args.memory_variants)  # bad ones fail before any run
    args.reference_dir = args.reference_dir or os.path.join(args.cache_dir, "bench-reference")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    info = env_info()
    peak = measure_matmul_tflops()
    h2d = measure_h2d_gbps()
    log.info("device %s, bf16 matmul %.0f TFLOP/s, H2D %s", info["device"], peak or 0, h2d)
    records: list[dict] = []
    os.makedirs(args.out, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    dev = info["device"].replace(" ", "-")
    path = os.path.join(args.out, f"{stamp}-{dev}{('-' + args.tag) if args.tag else ''}.json")

    def save():  # after every workload/variant: a run cut off by its time limit keeps what it measured
        add_ratios(records)
        with open(path, "w") as fh:
            json.dump({"env": {**info, "bf16_matmul_tflops": peak, "h2d_gbps": h2d}, "records": records}, fh,
                      indent=1)
    variants = args.variants.split(",")
    best = {**SDSERVE_BEST, **(json.loads(args.sdserve_settings) if args.sdserve_settings else {})}
    for wl in args.workloads.split(","):
        batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else WORKLOADS[wl][4]
        flops = bench_diffusers(wl, variants, batches, args.repeats, info, peak, records, count=not args.no_flops,
                                compile_batches=[int(b) for b in args.compile_batches.split(",")]
                                if args.compile_batches else None)
        save()
        reference = None
        if "sdserve" in variants:
            reference = bench_sdserve(wl, "sdserve", best, batches, args.repeats, info, peak, flops, records,
                                      args.cache_dir, profile_dir=args.out if args.profile else None)
            for root in (args.reference_dir, os.path.join(args.out, "reference")):
                save_reference(root, wl, reference)
            save()
        reference = reference or load_reference(args.reference_dir, wl)  # from an earlier call
        if "sdserve-deepcache" in variants:  # same settings + step caching; quality vs the images just made
            # No FLOP count: shallow steps skip most of the UNet, so the full-UNet count would inflate its MFU.
            for n, interval in enumerate(int(v) for v in str(args.deepcache_interval).split(",")):
                bench_sdserve(wl, "sdserve-deepcache" + (f"-i{interval}" if n else ""),
                              {**best, "step_cache": {"interval": interval}}, batches, args.repeats, info, peak, {},
                              records, args.cache_dir, reference=reference)
                save()
        for name, settings in (json.loads(args.extra_sdserve) if args.extra_sdserve else {}).items():
            bench_sdserve(wl, name, {**best, **settings}, batches, args.repeats, info, peak, flops, records,
                          args.cache_dir, reference=reference)
            save()
        if args.auto_budgets:
            records.extend(auto_choices(wl, [float(b) for b in args.auto_budgets.split(",")], info))
        level_ref = None  # the first level's images (NONE): every other level's quality is read against them
        # engines kept alive for the interleaved timing (not under an enforced budget: it caps the whole process)
        kept: list | None = [] if args.vram_budget_gib is None else None
        for variant in memory_variants:
            images = bench_sdserve(wl, variant.name, {"attention": "sdpa", "warmup_steps": 1},
                                   (1,), args.repeats, info, peak, flops, records, args.cache_dir, memory=variant,
                                   reference=level_ref, pinned_gbps=h2d.get("pinned"),
                                   profile_dir=args.out if args.profile else None,
                                   vram_budget_gib=args.vram_budget_gib, keep=kept)
            level_ref = level_ref or images
            save()
        if kept and len(kept) > 1:
            add_interleaved([rec for rec, _ in kept], interleave([fn for _, fn in kept], args.rounds or args.repeats + 1))
            kept.clear()
            reset_peak()
            save()
    save()
    print(f"\nwrote {path}")
    print(f"{'workload':14} {'variant':26} {'b':>3} {'lat_s':>8} {'img/s':>7} {'vram':>6} {'mfu':>5} {'vs_eag':>6} {'vs_cmp':>6}")
    for r in records:
        if r["latency_s"] is None:
            print(f"{r['workload']:14} AUTO @ {r['budget_gib']} GiB -> {r['memory_level']} (est {r['estimate_gib']} GiB)")
            continue
        q = r.get("quality")
        print(f"{r['workload']:14} {r['variant']:26} {r['batch']:>3} {r['latency_s']:>8.3f} {r['img_per_s']:>7.2f} "
              f"{(r['peak_vram_gib'] or 0):>6.2f} {(r['mfu'] or 0):>5.2f} {r.get('speedup_vs_diffusers-eager', 0):>6.2f} "
              f"{r.get('speedup_vs_diffusers-compile', 0):>6.2f}"
              + (f"  PSNR {q['psnr_db']} dB, mean |diff| {q['mean_abs_diff']}" if q else "")
              + (f"  interleaved {r['interleaved_s']} s = {r['interleaved_vs_first']}x first" if "interleaved_s" in r
                 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
