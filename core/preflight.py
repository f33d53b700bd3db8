"""Fail fast on resources the cluster does not have, and say so while something stays pending.

Ray waits forever for a replica or actor that asks for a resource no node has (`num_gpus: 0.5` on a machine
without GPUs): Serve keeps the app DEPLOYING, Ray Data keeps its actor pool pending. `sdserve serve` and
`sdserve batch` describe what they will ask for as `Demand`s and check them against `ray.cluster_resources()`
before submitting anything; `PendingWatcher` prints a warning while something is still waiting.

Pure Python (no Ray import): the callers pass the cluster's resources and the polling function in.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

SKIP_HINT = "an autoscaling cluster that will add such nodes: pass --no-resource-check"
ADVICE = {"GPU": "0 runs on CPU"}  # said once per missing resource, after the keys that set it


@dataclass
class Demand:
    """`count` units (replicas, actors), each asking for `resources` ({"CPU": 1, "GPU": 0.5}); `fix` names, per
    resource, the flag or config key that sets it."""

    what: str
    count: int
    resources: dict[str, float]
    fix: dict[str, str]
    per_unit: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.per_unit = {k: float(v) for k, v in self.resources.items() if v}


class ResourceError(RuntimeError):
    """The cluster cannot place what was asked for; the message says what is missing and what to change."""


def _fmt(x: float) -> str:
    return f"{x:g}"


def shortfalls(demands: list[Demand], cluster: dict[str, float]) -> list[str]:
    """One line per resource the cluster lacks: per unit (no node could ever hold one) or in total (the fixed
    count never fits). Empty when everything fits."""
    problems = []
    keys = sorted({k for d in demands for k in d.per_unit})
    for key in keys:
        have = float(cluster.get(key, 0.0))
        users = [d for d in demands if key in d.per_unit]
        need = sum(d.count * d.per_unit[key] for d in users)
        if need <= have + 1e-9:
            continue
        parts = ", ".join(f"{d.what}: {d.count} x {_fmt(d.per_unit[key])}" for d in users)
        fixes = " or ".join(dict.fromkeys(d.fix.get(key, f"the {key} request of {d.what}") for d in users))
        advice = f" ({ADVICE[key]})" if key in ADVICE else ""
        problems.append(f"needs {_fmt(need)} {key} ({parts}) but the Ray cluster has {_fmt(have)} {key}: "
                        f"change {fixes}{advice}")
    return problems


def check_resources(demands: list[Demand], cluster: dict[str, float]) -> None:
    """Raise ResourceError (one message, one line per missing resource) when the demands cannot be placed."""
    problems = shortfalls(demands, cluster)
    if problems:
        raise ResourceError("; ".join(problems) + f" (for {SKIP_HINT})")


class PendingWatcher:
    """A daemon thread that calls `poll()` every `every_s` seconds; `poll` returns messages about things still
    pending (empty when all is placed). Each new message is passed to `warn` once; it is repeated only after it
    went away and came back, so a long wait does not flood the terminal."""

    def __init__(self, poll: Callable[[], list[str]], warn: Callable[[str], None], every_s: float = 10.0):
        self.poll, self.warn, self.every_s = poll, warn, every_s
        self._stop = threading.Event()
        self._seen: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="pending-watcher", daemon=True)

    def start(self) -> "PendingWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check_once(self) -> list[str]:
        try:
            current = list(self.poll())
        except Exception as err:  # noqa: BLE001 - a status call failing must never stop the server or the job
            current = [f"could not read the cluster's status ({type(err).__name__}: {err})"]
        new = [m for m in current if m not in self._seen]
        for message in new:
            self.warn(message)
        self._seen = set(current)
        return new

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.check_once()

    def __enter__(self) -> "PendingWatcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
