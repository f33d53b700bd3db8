"""Start-up progress for `sdserve serve`: what each model's replicas are doing while `serve.run` waits for them.

Loading, compiling and warming up a model takes seconds (tiny models) to many minutes (SDXL with torch.compile),
and `serve.run` prints nothing meanwhile. `StartupReporter` polls `serve.status()` from a driver thread and prints
each model's replica states when they change plus a heartbeat every `heartbeat_s`; when a model turns HEALTHY it
asks one replica (`ModelServer.info`) for its load stages, warm-up shapes and compile results and prints them.

Usage (serving/cli.py): `with StartupReporter(config): serve.run(...)`.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from serving.config import ServingConfig, model_deployment_name


def _secs(value: float) -> str:
    return f"{value:.1f}s"


def describe_state(model: str, status: str, replica_states: dict[str, int], want: int | None, elapsed_s: float,
                   message: str = "") -> str:
    """One line for a model's deployment state, e.g. 'model sdxl: 0/2 replicas running (2 starting), 95.0s'."""
    running = replica_states.get("RUNNING", 0)
    others = ", ".join(f"{n} {state.lower()}" for state, n in sorted(replica_states.items())
                       if state != "RUNNING" and n)
    total = want if want is not None else sum(replica_states.values())
    line = f"model {model}: {status.lower()}, {running}/{total} replicas running"
    if others:
        line += f" ({others})"
    line += f", {_secs(elapsed_s)}"
    if message and status != "HEALTHY":
        line += f" - {message.splitlines()[0][:200]}"
    return line


def describe_ready(model: str, info: dict[str, Any]) -> str:
    """What a ready replica did to start: load stages, warm-up per shape, compile (from ModelServer.info)."""
    stages = ", ".join(f"{k} {_secs(v)}" for k, v in (info.get("load_times") or {}).items())
    line = f"model {model} ready on {info.get('device')} {info.get('dtype')}: load {_secs(info.get('load_s', 0))}"
    if stages:
        line += f" ({stages})"
    line += f", warm-up {_secs(info.get('warmup_s', 0))}"
    shapes = ", ".join(f"{k} {_secs(v)}" for k, v in (info.get("warmup_times") or {}).items())
    if shapes:
        line += f" ({shapes})"
    opts = info.get("optimizations") or {}
    compiled = {k: v for k, v in opts.items() if k.startswith("compile")}
    if compiled:
        line += f", {compiled}"
    return line


class StartupReporter:
    def __init__(self, config: ServingConfig, out: Callable[[str], None] | None = None, poll_s: float = 1.0,
                 heartbeat_s: float = 15.0):
        self.config, self.poll_s, self.heartbeat_s = config, poll_s, heartbeat_s
        self.out = out or (lambda line: print(f"sdserve: {line}", flush=True))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[str, tuple] = {}
        self._said: dict[str, float] = {}
        self._ready: set[str] = set()
        self._started = 0.0

    def __enter__(self) -> "StartupReporter":
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="serve-startup", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if exc[0] is None:
            self.poll()  # the final states: every model ready now that serve.run returned

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as err:  # noqa: BLE001 - the controller may not be up yet; progress never fails
                self.out(f"(start-up status unavailable: {type(err).__name__})")

    def poll(self) -> None:
        from ray import serve

        app = serve.status().applications.get(self.config.app_name)
        now = time.monotonic()
        for m in self.config.models:
            if m.name in self._ready:
                continue
            dep = app.deployments.get(model_deployment_name(m.name)) if app else None
            if dep is None:
                continue
            status = str(getattr(dep.status, "value", dep.status))
            states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
            key = (status, tuple(sorted(states.items())))
            if key != self._last.get(m.name) or now - self._said.get(m.name, 0) >= self.heartbeat_s:
                self._last[m.name], self._said[m.name] = key, now
                self.out(describe_state(m.name, status, states, m.deployment.num_replicas, now - self._started,
                                        dep.message))
            if status == "HEALTHY":
                self._ready.add(m.name)
                self._report_ready(m.name)

    def _report_ready(self, model: str) -> None:
        from ray import serve

        try:
            handle = serve.get_deployment_handle(model_deployment_name(model), self.config.app_name)
            info = handle.info.remote().result(timeout_s=30)
        except Exception as err:  # noqa: BLE001 - the details are a bonus; the state line was printed
            self.out(f"model {model} ready (details unavailable: {type(err).__name__})")
            return
        self.out(describe_ready(model, info))
