"""Measured seconds per UNet call, per call set (group key and step-cache phase), without making the host wait:
the step scheduler's fair share (core/scheduling_policy.py) counts GPU time with these, not calls.

On CUDA a call is bracketed by two `torch.cuda.Event(enable_timing=True)` recorded on the current stream; the
pair waits in a short FIFO and `poll()` (once per loop iteration) folds every pair whose end event has completed
(`Event.query()`, non-blocking) into the set's EWMA: the GPU thread never synchronizes for a measurement, and a
measurement arrives a call or two late (the host runs ahead of the GPU), which an EWMA does not mind. The events
time the stream between the two records: GPU work plus any gaps where the GPU waited for the host's launches, so
a host-bound (eager) call measures its wall time and a GPU-bound (compiled) one its GPU time - what the call
costs the other groups either way. Without CUDA the call is synchronous and perf_counter times it.

Before a set has a measurement its cost is estimated from the measured ones scaled by work units (latent pixels
x rows: right for GPU-bound calls, an overestimate for a large host-bound one, corrected by its first
measurement), and 1.0 when nothing is measured yet: all costs equal, which is the call-count share - the policy
degrades to counting calls, never to nothing.
"""
from __future__ import annotations

import collections
import contextlib
import time
from typing import Hashable, Iterator

ALPHA = 0.3  # EWMA weight of a new measurement: follows a batch size change within a few calls
MIN_SECONDS = 1e-6  # a cost never reads 0 (a group costing nothing would be owed at every call)
MAX_PENDING = 64  # event pairs in flight at most (the oldest is dropped unmeasured beyond: never a host wait)


class CallTimer:
    """Per-set EWMA of seconds per call (one instance per step scheduler; used by its GPU thread only)."""

    def __init__(self, use_cuda: bool | None = None):
        self.use_cuda = use_cuda  # None: CUDA if available (the step scheduler sets it from the engine's device)
        self.seconds: dict[Hashable, float] = {}  # EWMA of seconds per call
        self.per_unit: dict[Hashable, float] = {}  # the same over the call's work units (for the estimate)
        self.pending: collections.deque = collections.deque()  # (key, units, start, end) events not yet read

    @contextlib.contextmanager
    def measure(self, key: Hashable, units: float) -> Iterator[None]:
        """Time the call in the block (not on an exception: a failed call's time says nothing of its cost)."""
        if self.use_cuda is None:
            import torch

            self.use_cuda = torch.cuda.is_available()
        if self.use_cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.add_pending(key, units, start, end)
        else:
            t0 = time.perf_counter()
            yield
            self.fold(key, units, time.perf_counter() - t0)

    def add_pending(self, key: Hashable, units: float, start, end) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.pending.popleft()
        self.pending.append((key, units, start, end))

    def poll(self) -> None:
        """Fold the completed event pairs, oldest first, stopping at the first not done (never waits)."""
        while self.pending and self.pending[0][3].query():
            key, units, start, end = self.pending.popleft()
            self.fold(key, units, start.elapsed_time(end) / 1000.0)  # elapsed_time: milliseconds

    def fold(self, key: Hashable, units: float, seconds: float) -> None:
        old = self.seconds.get(key)
        self.seconds[key] = seconds if old is None else old + ALPHA * (seconds - old)
        unit = seconds / max(units, 1e-12)
        old = self.per_unit.get(key)
        self.per_unit[key] = unit if old is None else old + ALPHA * (unit - old)

    def estimate(self, key: Hashable, units: float) -> float:
        """Seconds per call of `key`: its EWMA, else the measured sets' mean seconds per unit x its units, else
        1.0 (nothing measured: every set costs the same, the call-count share)."""
        if key in self.seconds:
            return max(MIN_SECONDS, self.seconds[key])
        if self.per_unit:
            return max(MIN_SECONDS, units * sum(self.per_unit.values()) / len(self.per_unit))
        return 1.0

    def report_ms(self) -> dict[str, float]:
        """The measured ms per call by set, for engine.info() (keys as strings: JSON)."""
        return {_name(key): round(s * 1000.0, 3) for key, s in self.seconds.items()}


def _name(key: Hashable) -> str:
    """A group key (model, width, height[, ...]) with a step-cache phase -> "model 1024x1024 [full]"."""
    group, phase = key if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], tuple) else (key, None)
    if isinstance(group, tuple) and len(group) >= 3:
        name = f"{group[0]} {group[1]}x{group[2]}"
    else:
        name = str(group)
    return name if phase is None else f"{name} {'full' if phase else 'shallow'}"
