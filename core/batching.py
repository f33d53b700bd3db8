"""Grouping resolved requests into compatible pipeline calls.

Every image is one sample with its own prompt, negative prompt and generator; samples can share a pipeline
call only when everything that changes the computation is equal: the compatibility key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

from core.schemas import MAX_SEED, GenerationRequest


def compat_key(req: GenerationRequest) -> Hashable:
    """Everything that changes the computation of a pipeline call (apart from per-sample prompts/seeds).

    CFG on/off is implied by guidance_scale. Requests must be resolved (no None fields).
    """
    return (req.model, req.width, req.height, req.steps, req.scheduler, float(req.guidance_scale))


@dataclass(frozen=True)
class Sample:
    request_index: int
    image_index: int
    seed: int
    prompt: str
    negative_prompt: str


def expand(requests: Sequence[tuple[int, GenerationRequest]]) -> list[Sample]:
    """One Sample per image; image i of a request uses seed + i (mod 2**32), as A1111 does."""
    out = []
    for idx, req in requests:
        for i in range(req.num_images):
            out.append(Sample(idx, i, (req.seed + i) % (MAX_SEED + 1), req.prompt, req.negative_prompt or ""))
    return out


def plan_batches(requests: Sequence[tuple[int, GenerationRequest]],
                 max_batch: int | Callable[[Hashable], int]) -> list[tuple[Hashable, list[Sample]]]:
    """Group by compat key (first-seen order, so no group starves), then chunk each group to <= max_batch images
    (a number, or a function of the key: the VRAM budget caps large sizes harder)."""
    groups: dict[Hashable, list[tuple[int, GenerationRequest]]] = {}
    for idx, req in requests:
        groups.setdefault(compat_key(req), []).append((idx, req))
    plan = []
    for key, members in groups.items():
        samples = expand(members)
        size = max(1, max_batch(key) if callable(max_batch) else max_batch)
        for start in range(0, len(samples), size):
            plan.append((key, samples[start:start + size]))
    return plan
