"""Simulates the step scheduler's cross-group pick (core/scheduling_policy.FairShare, the real class) on the SDXL
`mixed-shapes` load profile: Poisson arrivals, sizes 512x512 : 768x512 : 512x768 : 1024x1024 = 3 : 2 : 2 : 1,
30 steps with CFG, continuous batching per size (at most 8 images a call), one UNet call at a time. Per-call
seconds come from a cost model calibrated to the H100 eager record of issue #18 (~70 ms host-bound floor, a
1024x1024 image ~78 ms; GPU time ~ latent pixels x rows above that: the model's saturation throughput, 0.77 req/s,
matches the measured 0.78) or, with --mode compile, a GPU-bound one (costs ~ pixels x rows, 12 ms floor). The
policy gets its costs as the engine does: each simulated call's seconds fold into a core/call_timer.CallTimer, whose
estimates are the call sets' costs when the share counts time ("time x"; "calls x": every call costs 1.0). It
prints p50/p99 latency over the unloaded (batch 1) latency per size: the figure issue #18 asks about.

    PYTHONPATH=. python3 experiments/scheduling_sim.py --mode eager --rates 0.546,0.7
    PYTHONPATH=. python3 experiments/scheduling_sim.py --mode compile --rates 0.546,0.73,0.9
(0.546 and 0.73 req/s: ~0.7 x capacity eager / compiled; the table is in docs/serving.md, step 3.) "least-work"
(min_share 0 with starvation_s 2) is the policy before min_share; "srpt-t" measures least work in estimated
seconds instead of pixels x rows. Not product code; tests do not cover it.
"""
from __future__ import annotations

import argparse
import math
import random

from core.call_timer import CallTimer
from core.scheduling_policy import CallSet, FairShare

SIZES = (((512, 512), 3), ((768, 512), 2), ((512, 768), 2), ((1024, 1024), 1))
STEPS, CAP = 30, 8


def call_s(size, images: int, mode: str) -> float:
    pixels = size[0] * size[1] / 1024 ** 2
    gpu = 0.0375 * 2 * images * pixels  # 2 rows (CFG) per image
    return max(0.068 + 0.002 * images, gpu) if mode == "eager" else max(0.012 + 0.001 * images, gpu)


def decode_s(size, images: int) -> float:
    return 0.12 * images * size[0] * size[1] / 1024 ** 2


def unloaded_s(size, mode: str) -> float:
    return STEPS * call_s(size, 1, mode) + decode_s(size, 1)


def simulate(policy: FairShare, mode: str, rate: float, horizon_s: float, seed: int, unit: str = "calls",
             srpt: str = "pixels") -> dict:
    """unit: what the share counts, "calls" (every set costs 1.0) or "time" (the engine's way: each call's
    simulated seconds folded into a CallTimer, its estimates the sets' costs); srpt: the least-work measure,
    "pixels" (remaining calls x latent pixels x rows) or "time" (remaining calls x estimated seconds per call)."""
    timer = CallTimer(use_cuda=False)
    rng = random.Random(seed)
    sizes, weights = [s for s, _ in SIZES], [w for _, w in SIZES]
    arrivals, t = [], 0.0
    while t < horizon_s:
        t += rng.expovariate(rate)
        arrivals.append((t, rng.choices(sizes, weights)[0]))
    waiting = {s: [] for s in sizes}
    active = {s: [] for s in sizes}
    latency = {s: [] for s in sizes}
    now, i = 0.0, 0
    while True:
        while i < len(arrivals) and arrivals[i][0] <= now:
            at, size = arrivals[i]
            waiting[size].append({"submitted": at, "left": STEPS, "last_run": at})
            i += 1
        for size in sizes:
            while waiting[size] and len(active[size]) < CAP:
                sample = waiting[size].pop(0)
                sample["last_run"] = now
                active[size].append(sample)
        sets = []
        for size, m in active.items():
            if m:
                units = size[0] * size[1] * 2 * len(m)
                cost = timer.estimate(size, units) if unit == "time" or srpt == "time" else 1.0
                work = min(s["left"] for s in m) * (units if srpt == "pixels" else cost)
                sets.append(CallSet(size, work, min(s["submitted"] for s in m), min(s["last_run"] for s in m),
                                    cost=cost if unit == "time" else 1.0))
        if not sets:
            if i == len(arrivals):
                return latency
            now = arrivals[i][0]
            continue
        size = policy.pick(sets, now).group
        members = active[size]
        took = call_s(size, len(members), mode)
        timer.fold(size, size[0] * size[1] * 2 * len(members), took)
        now += took
        for s in members:
            s["left"] -= 1
            s["last_run"] = now
        done = [s for s in members if not s["left"]]
        if done:
            now += decode_s(size, len(done))
            for s in done:
                members.remove(s)
                latency[size].append(now - s["submitted"])


def percentile(values: list, q: float) -> float:
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)]


POLICIES = {  # label -> (min_share, unit, srpt); min_share 0 with starvation_s 2: the policy before min_share
    "least-work": (0.0, "calls", "pixels"),
    "calls 0.1": (0.1, "calls", "pixels"), "calls 0.25": (0.25, "calls", "pixels"),
    "time 0.1": (0.1, "time", "pixels"), "time 0.25": (0.25, "time", "pixels"), "time 0.33": (0.33, "time", "pixels"),
    "time 0.5": (0.5, "time", "pixels"),
    "calls 0.25 srpt-t": (0.25, "calls", "time"), "time 0.25 srpt-t": (0.25, "time", "time"),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["eager", "compile"], default="eager")
    p.add_argument("--rates", default="0.546", help="arrivals per second (0.546: 0.7 x the measured eager capacity)")
    p.add_argument("--policies", default=",".join(POLICIES), help="labels of POLICIES, comma-separated")
    p.add_argument("--starvation-s", type=float, default=2.0)
    p.add_argument("--horizon-s", type=float, default=2000.0)
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()
    for rate in [float(r) for r in args.rates.split(",")]:
        print(f"== {args.mode}, {rate} req/s; p50 / p99 over unloaded: "
              + ", ".join(f"{w}x{h} {unloaded_s((w, h), args.mode):.2f} s" for (w, h), _ in SIZES))
        for label in args.policies.split(","):
            share, unit, srpt = POLICIES[label]
            merged: dict = {}
            for seed in range(args.seeds):
                out = simulate(FairShare(share, args.starvation_s), args.mode, rate, args.horizon_s, seed, unit, srpt)
                for size, values in out.items():
                    merged.setdefault(size, []).extend(values)
            cells = [f"{w}x{h} {percentile(v, 0.5) / unloaded_s((w, h), args.mode):5.2f} "
                     f"{percentile(v, 0.99) / unloaded_s((w, h), args.mode):5.2f}" for (w, h), v in merged.items()]
            print(f"{label:17s}| " + " | ".join(cells))


if __name__ == "__main__":
    main()
