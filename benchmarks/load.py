"""Open-loop load benchmark (issue 18): Poisson arrivals at fractions of the measured capacity, per traffic profile
and admission policy, in-process or over HTTP.

    python -m benchmarks.load configs/serve-sd15-bench.yaml --profiles uniform,mixed --admission batch,step \
        --rates 0.5,0.7,0.9,1.1 --duration-s 30                       (also: sdserve bench load ...)
    python -m benchmarks.load --url http://127.0.0.1:8000 --profiles mixed --capacity-rps 6.5
    python -m benchmarks.load --sizes 64x64 --steps 2 --duration-s 3   (CPU smoke run, embedded tiny-sd)

Per admission (in-process: a fresh engine built from the config with `scheduling.admission` set, or with
`--one-engine` the first admission's engine switched to the next admission between passes; `default` leaves the
config as it is), in this order: untimed warm-up requests (one per size), the unloaded latency (requests
one at a time, per profile and size), the capacity (closed-loop saturation: `--concurrency` requests outstanding,
with `--capacity-profile`, under the first admission; skipped with `--capacity-rps`, or with `--capacity-from` an
earlier call's records), each profile's own saturation throughput, then for every profile and rate fraction an
open-loop run: Poisson arrivals at fraction x capacity for `--duration-s`, then up to `--drain-timeout-s` for the
outstanding requests (still outstanding then: counted as errors of kind drain_timeout). Arrivals and bodies
depend on (seed, profile, rate) only: every admission gets the same requests at the same times.

One JSON record per (profile, admission, rate) in --out (benchmarks/results/load/), written as soon as measured;
`python -m benchmarks.load_report` prints them as the markdown table of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import logging
import shlex
import sys
import time
from typing import Any

from benchmarks.load_profiles import PROFILES, Profile, draw_bodies, make_profile, poisson_arrivals, shape_label
from benchmarks.load_report import capacity_from_records, write_record

# Stdlib-only at import (load_stats, the targets, torch come in when a run starts): `sdserve` registers the
# `bench load` arguments from here on every start.

log = logging.getLogger("bench.load")


# ---------------------------------------------------------------------------------------------- sending
async def _send(target, body: dict, rec: dict, t0: float) -> dict:
    rec["sent_s"] = time.perf_counter() - t0
    try:
        rec.update(await target.send(body))
    except asyncio.CancelledError:
        raise
    except Exception as err:  # noqa: BLE001 - a failure is a counted outcome, never a lost request
        rec.update(outcome=f"exception:{type(err).__name__}", message=str(err)[:300])
    rec["done_s"] = time.perf_counter() - t0
    rec["latency_s"] = rec["done_s"] - rec["arrival_s"]
    return rec


def _request_record(i: int, body: dict, arrival_s: float) -> dict:
    return {"i": i, "shape": shape_label(body["width"], body["height"]), "steps": body["steps"],
            "scheduler": body["scheduler"], "guidance_scale": body["guidance_scale"], "arrival_s": arrival_s,
            "outcome": None}


async def open_loop(target, bodies: list[dict], arrivals: list[float], drain_timeout_s: float) -> list[dict]:
    """Send bodies[i] at arrivals[i] (seconds from now) whatever is outstanding; wait for the last ones until
    drain_timeout_s after the last arrival. One record per body, each with an outcome."""
    t0 = time.perf_counter()
    records, tasks = [], []
    for i, (body, at) in enumerate(zip(bodies, arrivals)):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        rec = _request_record(i, body, at)
        records.append(rec)
        tasks.append(asyncio.create_task(_send(target, body, rec, t0)))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    given_up = time.perf_counter() - t0
    for rec in records:
        if rec["outcome"] is None:
            rec.update(outcome="drain_timeout", done_s=given_up, latency_s=None)
    return records


async def closed_loop(target, bodies: list[dict], concurrency: int) -> tuple[list[dict], float]:
    """`concurrency` workers each send the next body as soon as their previous one finished: (records, wall s)."""
    t0 = time.perf_counter()
    queue = list(enumerate(bodies))[::-1]
    records: list[dict] = []

    async def worker():
        while queue:
            i, body = queue.pop()
            rec = _request_record(i, body, time.perf_counter() - t0)
            records.append(rec)
            await _send(target, body, rec, t0)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    return sorted(records, key=lambda r: r["i"]), time.perf_counter() - t0


async def one_at_a_time(target, bodies: list[dict]) -> list[dict]:
    out = []
    for body in bodies:
        out += (await closed_loop(target, [body], 1))[0]
    return out


# ---------------------------------------------------------------------------------------------- phases
def saturation(records: list[dict], wall_s: float, concurrency: int) -> dict[str, Any]:
    from benchmarks.load_stats import histogram, latency_stats

    ok = [r for r in records if r["outcome"] == "ok"]
    # steady_rps: completions while all `concurrency` requests were outstanding, i.e. without the ramp-up (the
    # first `concurrency` completions) and the drain (the last ones, with the queue empty). Requests of different
    # step counts drain unevenly, so rps (all over the wall time) understates a mixed profile's rate.
    done = sorted(r["done_s"] for r in ok)
    steady = None
    if len(done) > 2 * concurrency + 1 and done[-concurrency - 1] > done[concurrency]:
        steady = round((len(done) - 2 * concurrency - 1) / (done[-concurrency - 1] - done[concurrency]), 4)
    return {"rps": round(len(ok) / wall_s, 4) if wall_s else 0.0, "steady_rps": steady, "requests": len(records),
            "ok": len(ok), "concurrency": concurrency, "wall_s": round(wall_s, 3),
            **latency_stats([r["latency_s"] for r in ok]),
            "batch_size_histogram": histogram(r["batch_size"] for r in ok if r.get("batch_size") is not None)}


async def warm_up(target, profiles: list[Profile], args) -> None:
    """Untimed: one-off costs of a size's first call (kernel selection, allocator growth) stay out of every
    figure. Default scheduler and step count only: what the engine must warm itself stays visible."""
    seen: set[tuple[int, int]] = set()
    for prof in profiles:
        for w, h, _ in prof.sizes:
            if (w, h) in seen:
                continue
            seen.add((w, h))
            plain = make_profile("uniform", sizes=f"{w}x{h}", steps=str(prof.steps[0]),
                                 output_format=prof.output_format)
            for rec in await one_at_a_time(target, draw_bodies(plain, args.warmup_requests, args.seed + 1)):
                if rec["outcome"] != "ok":
                    raise RuntimeError(f"warm-up request at {w}x{h} failed: {rec['outcome']}: "
                                       f"{rec.get('message')}")


async def unloaded(target, prof: Profile, args) -> dict[str, list[float]]:
    """Per size: latencies of `--unloaded-requests` of the profile's requests sent one at a time."""
    out = {}
    for k, (w, h, _) in enumerate(prof.sizes):
        recs = await one_at_a_time(target, draw_bodies(prof, args.unloaded_requests, args.seed + 100 + k, (w, h)))
        out[shape_label(w, h)] = [round(r["latency_s"], 4) for r in recs if r["outcome"] == "ok"]
    return out


def _seed(args, prof: Profile, fraction: float) -> int:
    return args.seed * 1_000_003 + PROFILES.index(prof.name) * 1009 + int(round(fraction * 1000))


async def measure_rate(target, prof: Profile, fraction: float, capacity: float, args) -> tuple[list[dict], dict]:
    rate = fraction * capacity
    arrivals = poisson_arrivals(rate, args.duration_s, _seed(args, prof, fraction))
    bodies = draw_bodies(prof, len(arrivals), _seed(args, prof, fraction) + 1)
    before = target.recompiles()
    graphs = _dynamo_graphs()
    log.info("%s at %.2f x %.3f = %.3f req/s for %ss: %d requests", prof.name, fraction, capacity, rate,
             args.duration_s, len(arrivals))
    records = await open_loop(target, bodies, arrivals, args.drain_timeout_s)
    still = await target.settle(args.drain_timeout_s)
    after = target.recompiles()
    extra = {"rate_rps": round(rate, 4), "recompiles": (after - before) if None not in (before, after) else None,
             "recompiles_total": after, "still_running_after_drain": still}
    if graphs is not None and target.kind == "in-process":
        extra["dynamo_graphs_added"] = (_dynamo_graphs() or 0) - graphs
    return records, extra


def _dynamo_graphs() -> int | None:
    """Dynamo's count of graphs compiled in this process (a diagnostic next to the engine's recompile count)."""
    if "torch" not in sys.modules:
        return None
    from core.compile_cache import counters

    return counters().get("unique_graphs", 0)


# ---------------------------------------------------------------------------------------------- targets
def engine_config(args, admission: str):
    from serving.bench import local_engine_config
    from serving.config import load_serving_config

    from benchmarks.load_targets import set_admission

    config = load_serving_config(args.config)
    models = {m.name: m for m in config.models}
    if args.model and args.model not in models:
        raise ValueError(f"--model {args.model}: not in the config ({', '.join(models)})")
    cfg = local_engine_config(models[args.model or config.default_model])
    if args.source or args.device:
        data = cfg.model_dump()
        data.update({k: v for k, v in (("source", args.source), ("device", args.device)) if v})
        cfg = type(cfg).model_validate(data)
    return cfg if admission == "default" else set_admission(cfg, admission)


def build_target(args, admission: str):
    from benchmarks.load_targets import EngineTarget, HttpTarget

    if args.url:
        return HttpTarget(args.url, api_key=args.api_key, timeout_s=args.timeout_s, model=args.model,
                          admission=None if admission == "default" else admission)
    from core.engine import Engine

    return EngineTarget(Engine(engine_config(args, admission)).load())


def release(target) -> None:
    """Free the engine (GPU memory, compiled graphs) before the next admission's is built."""
    if getattr(target, "engine", None) is None:
        return
    target.engine = None
    gc.collect()
    try:
        import torch

        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def env(args) -> dict[str, Any]:
    """The record's device and versions. HTTP: the GPU's name from nvidia-smi (a CUDA context in this client
    would take GPU memory from the server it measures on the same host)."""
    if args.url:
        import shutil

        from benchmarks.replica_inventory import query_nvidia_smi

        exe = shutil.which("nvidia-smi")
        rows = query_nvidia_smi(exe, "gpu=name", timeout_s=30, check=False) if exe else []
        info: dict[str, Any] = {"device": rows[0][0] if rows else "unknown"}
    else:
        from benchmarks.gpu_bench import env_info

        info = env_info()
    if args.device_label:
        info["device"] = args.device_label
    return info


async def run(args, argv: list[str]) -> list[dict]:
    from benchmarks.load_stats import summarize

    profiles = [make_profile(p, args.sizes, args.steps, args.scale, args.output_format) for p in args.profiles]
    cap_profile = next((p for p in profiles if p.name == args.capacity_profile), None) or make_profile(
        args.capacity_profile, args.sizes, args.steps, args.scale, args.output_format)
    info = env(args)
    capacity, capacity_from = args.capacity_rps, "given" if args.capacity_rps else None
    if args.capacity_from:
        model = args.model if args.url else engine_config(args, "default").name
        capacity, capacity_from = capacity_from_records(args.capacity_from, model, args.capacity_profile)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    written: list[dict] = []
    target = None
    for n, admission in enumerate(args.admission):
        if target is None:
            target = build_target(args, admission)
        else:  # --one-engine: the same compiled engine, the other admission
            target.switch_admission(admission)
        try:
            await warm_up(target, profiles + [cap_profile], args)
            base = {p.name: await unloaded(target, p, args) for p in profiles}
            sat: dict[str, dict] = {}
            if capacity is None:
                bodies = draw_bodies(cap_profile, args.capacity_requests, args.seed + 3)
                sat[cap_profile.name] = saturation(*await closed_loop(target, bodies, args.concurrency),
                                                   args.concurrency)
                capacity, capacity_from = sat[cap_profile.name]["rps"], f"{cap_profile.name}, {admission}"
                log.info("capacity %.3f req/s (%s)", capacity, capacity_from)
                if not capacity:
                    raise RuntimeError(f"capacity measurement served nothing: {sat[cap_profile.name]}")
            for prof in profiles:
                if args.no_saturation or prof.name in sat:
                    continue
                bodies = draw_bodies(prof, args.capacity_requests, args.seed + 3)
                sat[prof.name] = saturation(*await closed_loop(target, bodies, args.concurrency), args.concurrency)
            desc = target.describe()
            for prof in profiles:
                for fraction in args.rates:
                    records, extra = await measure_rate(target, prof, fraction, capacity, args)
                    rec = {"bench": "load", "date": date, "device": info["device"], "env": info,
                           "model": desc.get("model"), "model_source": desc.get("model_source"),
                           "target": desc["target"], "engine_api": desc["engine_api"], "url": desc.get("url"),
                           "profile": prof.name, "profile_spec": prof.describe(), "admission": desc.get("admission"),
                           "admission_requested": admission, "rate_fraction": fraction, **extra,
                           "capacity_rps": capacity, "capacity_from": capacity_from,
                           "capacity_profile": args.capacity_profile,
                           "saturation": sat.get(prof.name), "duration_s": args.duration_s,
                           "drain_timeout_s": args.drain_timeout_s, "seed": args.seed, "tag": args.tag,
                           **summarize(records, args.duration_s, base[prof.name]),
                           "unloaded_s": base[prof.name], "engine": desc.get("engine"),
                           "command": shlex.join(["python", "-m", "benchmarks.load", *argv]),
                           "requests": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                        for r in records]}
                    rec["model"] = rec["model"] or next((r.get("model") for r in records if r.get("model")), None)
                    path = write_record(args.out, rec)
                    written.append(rec)
                    c = rec["counts"]
                    print(f"{prof.name} {admission} {fraction:g}x: {c['ok']}/{c['sent']} ok, "
                          f"{rec['throughput_rps']} req/s, p99 {rec['p99_s']} s -> {path}", file=sys.stderr,
                          flush=True)
        finally:
            if not args.one_engine or n == len(args.admission) - 1:
                await target.aclose()
                release(target)
                target = None
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="serving or engine YAML (default: embedded tiny-sd); in-process: the "
                   "engine is built as a replica of it would be, on this host's GPU")
    p.add_argument("--model", help="which model of the config (default: the first); HTTP: sent as `model`")
    p.add_argument("--source", help="override the model's source, e.g. embedded:sdxl")
    p.add_argument("--device", help="override the engine's device: auto | cpu | cuda[:N]")
    p.add_argument("--url", help="HTTP target: a running server's base URL (POST {url}/v1/generate)")
    p.add_argument("--api-key", help="HTTP: sent as 'Authorization: Bearer <key>'")
    p.add_argument("--timeout-s", type=float, default=600.0, help="HTTP: per-request timeout")
    p.add_argument("--profiles", default="uniform,mixed", help=f"comma list of {', '.join(PROFILES)}")
    p.add_argument("--admission", default="default", help="comma list of scheduling.admission values (step, "
                   "batch), each a fresh engine; default: the config's. HTTP: one label naming the server's")
    p.add_argument("--one-engine", action="store_true", help="in-process: load the engine once and switch its "
                   "admission between passes (warm-up paid once: a compiled replica's takes minutes)")
    p.add_argument("--rates", default="0.5,0.7,0.9,1.1", help="comma list of fractions of the capacity")
    p.add_argument("--capacity-rps", type=float, help="the capacity in req/s (skips its measurement)")
    p.add_argument("--capacity-from", help="reuse the capacity of the newest record in this folder (or file) of "
                   "the same model and capacity profile: a run split over several calls offers the same rates")
    p.add_argument("--capacity-profile", default="uniform", choices=PROFILES,
                   help="profile of the capacity measurement (mixed-shapes runs: mixed-shapes)")
    p.add_argument("--capacity-requests", type=int, default=64, help="requests per closed-loop saturation run")
    p.add_argument("--concurrency", type=int, default=16, help="outstanding requests of a saturation run")
    p.add_argument("--no-saturation", action="store_true", help="skip the per-profile saturation runs")
    p.add_argument("--duration-s", type=float, default=60.0, help="sending window of each open-loop run")
    p.add_argument("--drain-timeout-s", type=float, default=120.0, help="wait for outstanding requests after it")
    p.add_argument("--warmup-requests", type=int, default=1, help="untimed requests per size before measuring")
    p.add_argument("--unloaded-requests", type=int, default=5, help="one-at-a-time requests per profile and size")
    p.add_argument("--sizes", help="override the profiles' sizes: WxH[:weight],... (uniform: the first)")
    p.add_argument("--steps", help="override the profiles' steps: comma list (uniform, mixed-shapes: the first)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every side (multiple of 8, >= 64)")
    p.add_argument("--output-format", default="png", choices=["png", "jpeg", "webp"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-label", help="the record's device (HTTP: the server's GPU; default: this host's)")
    p.add_argument("--out", default="benchmarks/results/load")
    p.add_argument("--tag", default="", help="appended to the record file names")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Split the comma lists and refuse bad values (p.error: exit code 2, naming the option)."""
    args.profiles = [s.strip() for s in args.profiles.split(",") if s.strip()]
    args.admission = [s.strip() for s in args.admission.split(",") if s.strip()]
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        p.error(f"--rates: comma list of numbers, got {args.rates!r}")
    bad = [x for x in args.profiles if x not in PROFILES]
    if bad or not args.profiles:
        p.error(f"--profiles: unknown {bad}; valid: {', '.join(PROFILES)}")
    if not args.rates or any(r <= 0 for r in args.rates):
        p.error("--rates: positive fractions, e.g. 0.5,0.7,0.9,1.1")
    if not args.admission or (args.url and len(args.admission) > 1):
        p.error("--admission: one label with --url (the server's admission is its config's), else a comma list")
    if args.one_engine and args.url:
        p.error("--one-engine: in-process only (an HTTP server's admission is its config's)")
    if args.capacity_rps is not None and args.capacity_rps <= 0:
        p.error("--capacity-rps must be > 0")
    if args.capacity_rps and args.capacity_from:
        p.error("--capacity-rps and --capacity-from: give one")
    if args.duration_s <= 0 or args.drain_timeout_s < 0 or args.concurrency < 1 or args.capacity_requests < 1:
        p.error("--duration-s, --concurrency and --capacity-requests must be > 0, --drain-timeout-s >= 0")
    try:
        for prof in args.profiles + [args.capacity_profile]:
            make_profile(prof, args.sizes, args.steps, args.scale)
    except ValueError as err:
        p.error(str(err))
    return args


def run_from_args(args: argparse.Namespace, argv: list[str]) -> int:
    """Run with checked arguments (check_arguments); `argv` is recorded as the record's command."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.url:
        from core.config import format_validation_error

        try:  # a bad config, model or admission value fails here, before minutes of loading
            for admission in args.admission:
                engine_config(args, admission)
            if args.capacity_from:
                capacity_from_records(args.capacity_from, engine_config(args, "default").name, args.capacity_profile)
        except (ValueError, OSError) as err:
            print(f"error: {format_validation_error(err)}", file=sys.stderr)
            return 2
    records = asyncio.run(run(args, argv))
    from benchmarks.load_report import table

    print(table(records))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_from_args(check_arguments(p, p.parse_args(argv)), argv)


if __name__ == "__main__":
    raise SystemExit(main())
