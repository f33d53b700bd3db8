"""GET /sdapi/v1/progress and POST /sdapi/v1/interrupt: the in-flight A1111 generations of one ingress replica,
in A1111's ProgressResponse shape (modules/api/models.py). Pure: no FastAPI, no Ray.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Generation:
    """One in-flight /sdapi generation of this ingress replica."""

    job: str
    started: float
    timestamp: str
    step: int = 0
    steps: int = 0
    interrupted: bool = False
    current_image: str | None = None  # the latest live preview (base64 JPEG of its first image)
    cancel: Callable[[], None] | None = None  # set by the route: stops the request in the engine


class ProgressBoard:
    """In-flight A1111 generations of one ingress replica: what GET progress reports, what interrupt cancels.

    A1111 runs one job at a time; here several can run at once. progress/eta/sampling_step describe the oldest
    running one (what a single client polling after its own request sees); job_count is how many are running.
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.running: dict[int, Generation] = {}
        self._next = 0
        self.last_interrupted = False

    def begin(self, job: str) -> tuple[int, Generation]:
        now = self.clock()
        gen = Generation(job, now, time.strftime("%Y%m%d%H%M%S", time.localtime(now)))
        self._next += 1
        self.running[self._next] = gen
        self.last_interrupted = False
        return self._next, gen

    def end(self, key: int) -> None:
        gen = self.running.pop(key, None)
        if gen is not None and gen.interrupted:
            self.last_interrupted = True

    def interrupt(self) -> int:
        """Cancel every running generation; returns how many."""
        for gen in self.running.values():
            gen.interrupted = True
            if gen.cancel is not None:
                gen.cancel()
        return len(self.running)

    def progress(self, skip_current_image: bool = False) -> dict[str, Any]:
        """A1111's ProgressResponse. current_image: the reported generation's latest live preview (base64 JPEG
        of its first image, as A1111 sends a base64 image), None before its first preview, with previews off,
        or when the client passes skip_current_image (as in A1111)."""
        state = {"skipped": False, "interrupted": self.last_interrupted, "stopping_generation": False, "job": "",
                 "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if not self.running:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        gen = min(self.running.values(), key=lambda g: g.started)
        state.update({"interrupted": gen.interrupted, "job": gen.job, "job_count": len(self.running),
                      "job_timestamp": gen.timestamp, "sampling_step": gen.step, "sampling_steps": gen.steps})
        # A1111's formula (modules/api/api.py progressapi): 0.01 keeps the ETA finite before the first step.
        progress = 0.01 + (gen.step / gen.steps if gen.steps else 0.0)
        elapsed = max(0.0, self.clock() - gen.started)
        eta = elapsed / progress - elapsed
        return {"progress": min(progress, 1.0), "eta_relative": max(0.0, eta), "state": state,
                "current_image": None if skip_current_image else gen.current_image, "textinfo": None}
