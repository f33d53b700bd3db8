"""What the open-loop load benchmark (benchmarks/load.py) sends, and when: traffic profiles and Poisson arrivals.

Stdlib only: the plan is built and tested without torch, Ray or a model.

Profiles (every draw from a `random.Random(seed)`: same seed, same requests):
- `uniform`: identical bodies but for the seed: one size (512x512), 30 steps, guidance 7.5, euler. The
  request-level-batching best case.
- `mixed`: as real users send them: steps uniform over 20/25/30/40, guidance over 5/6/7/7.5, scheduler over
  euler/euler_a/dpmpp_2m_karras/unipc, each drawn independently; one size (512x512).
- `mixed-shapes`: sizes 512x512 : 768x512 : 512x768 : 1024x1024 drawn with weights 3 : 2 : 2 : 1 (one request in
  eight is the big one, about a third of the pixels); 30 steps, guidance 7.5, euler. Per-size latency is
  reported, so the small requests' p99 can be read while the 1024² ones run.

`sizes` / `steps` override a profile's (`--sizes 64x64 --steps 2` for a CPU smoke run; `uniform` takes the first
size and step count of a list, `mixed-shapes` the first step count); `scale` multiplies every
side (rounded to a multiple of 8, at least 64): `--scale 0.125` turns the SDXL shapes into 64..128 pixel ones.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace

PROFILES = ("uniform", "mixed", "mixed-shapes")
MIXED_STEPS = (20, 25, 30, 40)
MIXED_GUIDANCE = (5.0, 6.0, 7.0, 7.5)
MIXED_SCHEDULERS = ("euler", "euler_a", "dpmpp_2m_karras", "unipc")
SHAPE_MIX = ((512, 512, 3.0), (768, 512, 2.0), (512, 768, 2.0), (1024, 1024, 1.0))  # (width, height, weight)


@dataclass(frozen=True)
class Profile:
    """The distribution one profile draws request bodies from (each field drawn independently)."""

    name: str
    sizes: tuple[tuple[int, int, float], ...]  # (width, height, weight)
    steps: tuple[int, ...]
    guidance: tuple[float, ...]
    schedulers: tuple[str, ...]
    output_format: str = "png"
    extra: dict = field(default_factory=dict)  # further body fields, the same in every request

    def describe(self) -> dict:
        """The profile as a record stores it."""
        return {**asdict(self), "sizes": [f"{w}x{h}:{wt:g}" for w, h, wt in self.sizes]}

    @property
    def shapes(self) -> list[str]:
        return [shape_label(w, h) for w, h, _ in self.sizes]


def shape_label(width: int, height: int) -> str:
    return f"{width}x{height}"


def parse_sizes(text: str) -> tuple[tuple[int, int, float], ...]:
    """'512x512:3,768x512:2' -> ((512, 512, 3.0), (768, 512, 2.0)); a size without weight has weight 1."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        size, _, weight = item.partition(":")
        try:
            w, h = (int(v) for v in size.lower().split("x"))
            wt = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"bad size {item!r}: expected WIDTHxHEIGHT[:WEIGHT], e.g. 768x512:2") from None
        if w % 8 or h % 8 or w < 64 or h < 64 or wt <= 0:
            raise ValueError(f"bad size {item!r}: sides are multiples of 8, at least 64; weights > 0")
        out.append((w, h, wt))
    if not out:
        raise ValueError("no sizes given")
    return tuple(out)


def scale_side(side: int, scale: float) -> int:
    return max(64, int(round(side * scale / 8)) * 8)


def make_profile(name: str, sizes: str | None = None, steps: str | None = None, scale: float = 1.0,
                 output_format: str = "png") -> Profile:
    """The named profile, with the CLI's overrides (`sizes`, `steps`: comma lists; `scale`: a side factor)."""
    if name == "uniform":
        prof = Profile(name, ((512, 512, 1.0),), (30,), (7.5,), ("euler",))
    elif name == "mixed":
        prof = Profile(name, ((512, 512, 1.0),), MIXED_STEPS, MIXED_GUIDANCE, MIXED_SCHEDULERS)
    elif name == "mixed-shapes":
        prof = Profile(name, SHAPE_MIX, (30,), (7.5,), ("euler",))
    else:
        raise ValueError(f"unknown profile {name!r}; valid: {', '.join(PROFILES)}")
    if sizes:
        parsed = parse_sizes(sizes)
        prof = replace(prof, sizes=((*parsed[0][:2], 1.0),) if name == "uniform" else parsed)  # uniform: one size
    if steps:
        values = tuple(int(s) for s in steps.split(",") if s.strip())
        # uniform and mixed-shapes keep every other field fixed: their step count is the first value
        prof = replace(prof, steps=values if name == "mixed" else values[:1])
    if scale != 1.0:
        merged: dict[tuple[int, int], float] = {}
        for w, h, wt in prof.sizes:  # scaled sizes may coincide (64 is the floor): weights add up
            key = (scale_side(w, scale), scale_side(h, scale))
            merged[key] = merged.get(key, 0.0) + wt
        prof = replace(prof, sizes=tuple((w, h, wt) for (w, h), wt in merged.items()))
    return replace(prof, output_format=output_format)


def draw_body(profile: Profile, rng: random.Random, index: int, size: tuple[int, int] | None = None) -> dict:
    """One request body of the profile (`size` forces the shape: unloaded latency is measured per shape)."""
    if size is None:
        w, h, _ = rng.choices(profile.sizes, weights=[s[2] for s in profile.sizes])[0]
    else:
        w, h = size
    return {"prompt": f"load benchmark {profile.name} {index}", "width": w, "height": h,
            "steps": rng.choice(profile.steps), "guidance_scale": rng.choice(profile.guidance),
            "scheduler": rng.choice(profile.schedulers), "seed": rng.randrange(2**31),
            "output_format": profile.output_format, **profile.extra}


def draw_bodies(profile: Profile, n: int, seed: int, size: tuple[int, int] | None = None,
                offset: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [draw_body(profile, rng, offset + i, size) for i in range(n)]


def poisson_arrivals(rate_rps: float, duration_s: float, seed: int) -> list[float]:
    """Arrival times (seconds from the start, increasing, all < duration_s) of a Poisson process of `rate_rps`:
    exponential gaps of mean 1/rate, so arrivals do not wait for completions (open loop)."""
    if rate_rps <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be > 0")
    rng = random.Random(seed)
    out, t = [], rng.expovariate(rate_rps)
    while t < duration_s:
        out.append(t)
        t += rng.expovariate(rate_rps)
    return out
