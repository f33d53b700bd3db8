"""Proof for issue #7: several model replicas share one GPU at fractional num_gpus under mixed-size load.

    sdserve bench replicas configs/serve-four-replicas-h100.yaml --out $OUT/replica-proof.json
    python -m benchmarks.replica_proof configs/serve-four-replicas-h100.yaml --out ...        (the same)

Starts Ray (its own local instance unless --address is given) and Serve with the config, records every model
replica (replica id, actor id, pid, GPU ids, GPU fraction, VRAM budget), then fires a seeded random mix of
requests at every model over HTTP, concurrently: sizes from well below the model's default up to the largest
its limits accept (some of them too big for a replica's VRAM budget), 1..max_images_per_request images, a few
step counts. nvidia-smi is polled meanwhile (when there is one) for per-process and total GPU memory.

The proof holds (exit code 0) when: no request ran out of memory (error kind `oom`, HTTP 503 code `oom`); no
request got any other 5xx except clean queue-full backpressure (503 `overloaded`); the only 4xx are clean
capacity rejections; every model served requests; every replica at the end is the one recorded at the start
(same replica ids and pids, no dead or restarted replica actor) and every deployment is HEALTHY. Capacity
rejections are counted; `rejections_exercised` says whether the mix hit the rejection path at all.

On a host without CUDA (smoke test), `--num-gpus 1` gives Ray a logical GPU: placement by fractions is real,
but the engines run on CPU and no VRAM budget exists unless the config sets `memory.vram_budget_gib`.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

log = logging.getLogger("replica_proof")
REPLICA_PREFIX = "SERVE_REPLICA::"
# (width factor, height factor) of the model's default side, with a weight. "max": the largest square the
# model's limits accept. Both the big ones and "max" are meant to probe the VRAM budget.
SIZE_MIX: list[tuple[Any, float]] = [((0.75, 0.75), 3), ((1, 1), 6), ((1, 1.5), 2), ((1.5, 1), 2), ((1.5, 1.5), 2),
                                     ((2, 2), 1.5), ((2.5, 2.5), 1), ((3, 3), 1), ("max", 1.5)]
CLEAN_CAPACITY = "VRAM budget"  # the engine's capacity rejection says "... this replica's VRAM budget is ..."


# ---------------------------------------------------------------------------------------------- request plan
def default_side(model) -> int:
    """The model's default image side (what the engine uses when a request names no size)."""
    from core.engine import FAMILY_DEFAULTS, TINY_DEFAULTS

    eng = model.engine
    if eng.defaults.width:
        return eng.defaults.width
    if eng.embedded_name in ("tiny-sd", "tiny-sdxl"):
        return TINY_DEFAULTS[0]
    family = eng.family if eng.family != "auto" else ("sdxl" if "xl" in eng.source.lower() else "sd15")
    return FAMILY_DEFAULTS[family][0]


def size_menu(model) -> list[tuple[int, int, float]]:
    """(width, height, weight): multiples of 64 within the model's limits."""
    lim, side = model.engine.limits, default_side(model)

    def fit(px: float, cap: int) -> int:
        return max(64, min(cap // 64 * 64, int(round(px / 64)) * 64))

    out: dict[tuple[int, int], float] = {}
    for factor, weight in SIZE_MIX:
        if factor == "max":
            s = min(lim.max_width, lim.max_height, math.isqrt(lim.max_pixels)) // 64 * 64
            w = h = max(64, s)
        else:
            w, h = fit(side * factor[0], lim.max_width), fit(side * factor[1], lim.max_height)
        if w * h > lim.max_pixels:
            continue
        out[(w, h)] = out.get((w, h), 0) + weight
    return [(w, h, wt) for (w, h), wt in out.items()]


def request_plan(models: list, n: int, seed: int, steps: list[int], output_format: str = "jpeg") -> list[dict]:
    """n request bodies, models in turn, everything else drawn from a Random(seed): same seed, same plan."""
    rng = random.Random(seed)
    menus = {m.name: size_menu(m) for m in models}
    plan = []
    for i in range(n):
        m = models[i % len(models)]
        menu = menus[m.name]
        w, h, _ = rng.choices(menu, weights=[x[2] for x in menu])[0]
        lim = m.engine.limits
        plan.append({"model": m.name, "prompt": f"replica proof {i}", "seed": rng.randrange(2**31),
                     "width": w, "height": h, "num_images": rng.randint(1, lim.max_images_per_request),
                     "steps": min(rng.choice(steps), lim.max_steps), "output_format": output_format})
    return plan


# ---------------------------------------------------------------------------------------------- outcomes
def classify(status: int | str, body: Any) -> tuple[str, str | None, str]:
    """(outcome, code, message): ok | capacity | backpressure | oom | error_5xx | error_4xx | transport."""
    if isinstance(status, str):
        return "transport", status, ""
    if status == 200:
        return "ok", None, ""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # native 422: [{"loc": [...], "msg": ..., "type": ...}]
        msg = "; ".join(str(d.get("msg", "")) for d in detail if isinstance(d, dict))
        code = None
    elif isinstance(detail, dict):
        msg, code = str(detail.get("message", "")), detail.get("code")
    else:
        msg, code = str(detail if detail is not None else body)[:500], None
    low = msg.lower()
    if code == "oom" or any(t in low for t in ("out of memory", "out of gpu memory", "outofmemoryerror")):
        return "oom", code or "oom", msg
    if status == 503 and code == "overloaded":
        return "backpressure", code, msg
    if status >= 500:
        return "error_5xx", code, msg
    if status == 422 and CLEAN_CAPACITY in msg:
        return "capacity", "capacity", msg
    return "error_4xx", code, msg


async def run_load(url: str, plan: list[dict], concurrency: int, duration_s: float | None, headers: dict,
                   timeout_s: float, progress_every: int = 20) -> tuple[list[dict], float]:
    import httpx

    records: list[dict] = []
    queue: asyncio.Queue = asyncio.Queue()
    for i, body in enumerate(plan):
        queue.put_nowait((i, body))
    t_start = time.perf_counter()

    async def worker(client: httpx.AsyncClient):
        while True:
            if duration_s is not None and time.perf_counter() - t_start > duration_s:
                return
            try:
                i, body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            data: Any = None
            try:
                r = await client.post(f"{url}/v1/generate", json=body, headers=headers)
                status: int | str = r.status_code
                try:
                    data = r.json()
                except ValueError:
                    data = r.text[:500]
            except httpx.HTTPError as err:
                status, data = type(err).__name__, None
            outcome, code, msg = classify(status, data)
            rec = {"i": i, "model": body["model"], "width": body["width"], "height": body["height"],
                   "num_images": body["num_images"], "steps": body["steps"], "status": status, "outcome": outcome,
                   "latency_s": round(time.perf_counter() - t0, 3)}
            if outcome == "ok" and isinstance(data, dict):
                rec.update(batch_size=data.get("batch_size"), peak_vram_bytes=data.get("peak_vram_bytes"),
                           images=len(data.get("images", [])))
            else:
                rec.update(code=code, message=msg[:400])
            records.append(rec)
            if len(records) % progress_every == 0:
                print(f"replica proof: {len(records)}/{len(plan)} done, {time.perf_counter() - t_start:.0f}s",
                      file=sys.stderr, flush=True)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return sorted(records, key=lambda r: r["i"]), time.perf_counter() - t_start


# ---------------------------------------------------------------------------------------------- replicas
def replica_actors(app: str, deployment: str) -> list[dict]:
    """Every replica actor Ray knows for this deployment (alive and dead) from the GCS actor table."""
    from ray._private.state import actors  # DeveloperAPI; needs no dashboard

    prefix = f"{REPLICA_PREFIX}{app}#{deployment}#"
    out = []
    for a in actors().values():
        if a.get("Name", "").startswith(prefix):
            out.append({"replica": a["Name"][len(prefix):], "actor_id": a["ActorID"], "state": a["State"],
                        "pid": a["Pid"], "num_restarts": a["NumRestarts"]})
    return sorted(out, key=lambda a: a["replica"])


def replica_infos(app: str, deployment: str, want: set[str], timeout_s: float = 60) -> dict[str, dict]:
    """ModelServer.info() of each replica in `want` (handle calls are routed at random: call until all seen)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while set(seen) < want and time.monotonic() < deadline:
        try:
            info = handle.info.remote().result(timeout_s=30)
        except Exception as err:  # noqa: BLE001 - a dying replica; the actor table tells the rest
            log.warning("info() of %s failed: %s", deployment, err)
            time.sleep(0.5)
            continue
        seen[info["replica"]] = info
    return seen


def snapshot(config, app: str) -> dict[str, Any]:
    """Per model: Serve's deployment status and replica states, and every replica (actor table + info())."""
    from ray import serve

    from serving.builder import model_deployment_name

    status = serve.status().applications.get(app)
    out: dict[str, Any] = {"app_status": str(getattr(status.status, "value", status.status)) if status else "MISSING",
                           "models": {}}
    for m in config.models:
        dep = model_deployment_name(m.name)
        ds = status.deployments.get(dep) if status else None
        actors = replica_actors(app, dep)
        alive = {a["replica"] for a in actors if a["state"] == "ALIVE"}
        infos = replica_infos(app, dep, alive) if alive else {}
        replicas = []
        for a in actors:
            info = infos.get(a["replica"], {})
            replicas.append({**a, "info_pid": info.get("pid"), "device": info.get("device"),
                             "gpu_ids": info.get("gpu_ids"), "gpu_fraction": info.get("gpu_fraction"),
                             "vram_budget_bytes": info.get("vram_budget_bytes"),
                             "memory_level": (info.get("optimizations") or {}).get("memory_level"),
                             "family": info.get("family")})
        out["models"][m.name] = {
            "deployment": dep,
            "status": str(getattr(ds.status, "value", ds.status)) if ds else "MISSING",
            "replica_states": {str(getattr(k, "value", k)): v for k, v in (ds.replica_states or {}).items()}
            if ds else {},
            "replicas": replicas}
    return out


# ---------------------------------------------------------------------------------------------- nvidia-smi
class GpuPoller:
    """Polls nvidia-smi: peak used MiB per compute process (pid) and per GPU. Inactive without nvidia-smi."""

    def __init__(self, interval_s: float = 0.5):
        self.exe = shutil.which("nvidia-smi")
        self.interval_s = interval_s
        self.per_pid: dict[int, int] = {}
        self.per_gpu: dict[str, dict[str, int]] = {}
        self.samples = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _query(self, what: str) -> list[list[str]]:
        out = subprocess.run([self.exe, f"--query-{what}", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip() or out.stdout.strip())
        return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]

    def sample(self) -> None:
        try:
            for pid, used in self._query("compute-apps=pid,used_memory"):
                if pid.isdigit() and used.isdigit():
                    self.per_pid[int(pid)] = max(self.per_pid.get(int(pid), 0), int(used))
            for idx, used, total in self._query("gpu=index,memory.used,memory.total"):
                g = self.per_gpu.setdefault(idx, {"peak_used_mib": 0, "total_mib": int(total)})
                g["peak_used_mib"] = max(g["peak_used_mib"], int(used))
            self.samples += 1
        except Exception as err:  # noqa: BLE001 - a failed poll must not stop the proof; it is reported
            if len(self.errors) < 5:
                self.errors.append(f"{type(err).__name__}: {err}")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> "GpuPoller":
        if self.exe:
            self.sample()
            self._thread = threading.Thread(target=self._loop, name="nvidia-smi", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=15)
        if self.exe:
            self.sample()

    def report(self, replica_pids: dict[int, str]) -> dict[str, Any]:
        if not self.exe:
            return {"available": False, "note": "nvidia-smi not found: no independent GPU memory measure"}
        per_replica = {replica_pids[p]: mib for p, mib in self.per_pid.items() if p in replica_pids}
        other = {str(p): mib for p, mib in self.per_pid.items() if p not in replica_pids}
        return {"available": True, "samples": self.samples, "interval_s": self.interval_s, "errors": self.errors,
                "peak_used_mib_by_replica": per_replica, "peak_used_mib_other_pids": other,
                "sum_of_replica_peaks_mib": sum(per_replica.values()), "gpus": self.per_gpu,
                "note": None if per_replica or not self.per_pid else
                "nvidia-smi pids do not match the replica pids (PID namespace of a container?); "
                "see peak_used_mib_other_pids and gpus"}


# ---------------------------------------------------------------------------------------------- the proof
def summarize(records: list[dict], models: list[str]) -> dict[str, Any]:
    by_model: dict[str, Any] = {}
    for name in models:
        recs = [r for r in records if r["model"] == name]
        outcomes: dict[str, int] = {}
        statuses: dict[str, int] = {}
        for r in recs:
            outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        ok = [r for r in recs if r["outcome"] == "ok"]
        peaks = [r["peak_vram_bytes"] for r in ok if r.get("peak_vram_bytes")]
        rejected_sizes = sorted({f"{r['width']}x{r['height']}" for r in recs if r["outcome"] == "capacity"})
        by_model[name] = {
            "requests": len(recs), "statuses": statuses, "outcomes": outcomes,
            "images": sum(r.get("images", 0) for r in ok),
            "largest_served": max((f"{r['width']}x{r['height']}" for r in ok), key=lambda s: math.prod(
                map(int, s.split("x"))), default=None),
            "rejected_sizes": rejected_sizes,
            "max_batch_size": max((r.get("batch_size") or 0 for r in ok), default=0),
            "peak_vram_allocated_bytes": max(peaks) if peaks else None,
            "latency_s_p50": _pct([r["latency_s"] for r in ok], 0.5),
            "latency_s_max": max((r["latency_s"] for r in ok), default=None)}
    return by_model


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round((len(s) - 1) * q)))]


def verdict(report: dict[str, Any]) -> tuple[bool, list[str]]:
    failures = []
    recs = report["requests"]
    bad = [r for r in recs if r["outcome"] in ("oom", "error_5xx", "error_4xx", "transport")]
    for kind in ("oom", "error_5xx", "error_4xx", "transport"):
        n = sum(1 for r in bad if r["outcome"] == kind)
        if n:
            failures.append(f"{n} request(s) with outcome {kind}")
    for name, m in report["by_model"].items():
        if not m["outcomes"].get("ok"):
            failures.append(f"model {name} served no request")
    start, end = report["replicas_start"], report["replicas_end"]
    for name, m in end["models"].items():
        expected = report["expected_replicas"][name]
        first = start["models"][name]["replicas"]
        before = {(r["replica"], r["pid"]) for r in first if r["state"] == "ALIVE"}
        after = {(r["replica"], r["pid"]) for r in m["replicas"] if r["state"] == "ALIVE"}
        if len(before) != expected:
            failures.append(f"model {name}: {len(before)} replica(s) at the start, expected {expected}")
        if after != before:
            failures.append(f"model {name}: replicas changed: {sorted(before)} -> {sorted(after)}")
        known = {r["replica"] for r in first}
        new = [f"{r['replica']} ({r['state']})" for r in m["replicas"] if r["replica"] not in known]
        if new:
            failures.append(f"model {name}: replica actor(s) created during the run: {new}")
        gone = [r["replica"] for r in m["replicas"] if r["replica"] in {b[0] for b in before} and r["state"] != "ALIVE"]
        if gone:
            failures.append(f"model {name}: replica actor(s) died: {gone}")
        if any(r["num_restarts"] for r in m["replicas"]):
            failures.append(f"model {name}: a replica actor restarted")
        if m["status"] != "HEALTHY":
            failures.append(f"model {name}: deployment {m['status']} at the end")
        if m["replica_states"] != {"RUNNING": expected}:
            failures.append(f"model {name}: replica states {m['replica_states']} at the end")
    return not failures, failures


def expected_replicas(model) -> int:
    d = model.deployment
    if d.num_replicas is not None:
        return d.num_replicas
    if d.autoscaling_config is not None:
        a = d.autoscaling_config
        return a.initial_replicas if a.initial_replicas is not None else a.min_replicas
    return 1


def env_info() -> dict[str, Any]:
    """Versions and the GPU, without touching CUDA here (a CUDA context in the driver would hold GPU memory)."""
    from importlib.metadata import version

    import ray

    info: dict[str, Any] = {"ray": ray.__version__, "torch": version("torch"), "diffusers": version("diffusers"),
                            "host_cpus": os.cpu_count()}
    exe = shutil.which("nvidia-smi")
    if exe:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        info["gpus"] = [dict(zip(("index", "name", "total_mib", "driver"), (c.strip() for c in line.split(","))))
                        for line in out.stdout.splitlines() if line.strip()]
    return info


def run_proof(config, *, requests: int = 160, concurrency: int = 16, duration_s: float | None = None,
              seed: int = 0, steps: list[int] | None = None, port: int = 8012, address: str | None = None,
              num_cpus: int | None = None, num_gpus: int | None = None, api_key: str | None = None,
              request_timeout_s: float = 900.0, poll_interval_s: float = 0.5, config_path: str | None = None,
              logs_dir: str | None = None) -> dict[str, Any]:
    """Deploy `config`, load it, check it; the report (with `passed` and `failures`). See the module doc."""
    import ray
    from ray import serve

    from serving.builder import build_app, deployment_options, model_deployment_name

    steps = steps or [4, 6, 8]
    report: dict[str, Any] = {"date": dt.datetime.now().isoformat(timespec="seconds"), "config": config_path,
                              "app": config.app_name, "args": {"requests": requests, "concurrency": concurrency,
                              "duration_s": duration_s, "seed": seed, "steps": steps}}
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address or "local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=False)
    report["env"] = env_info()
    resources = ray.cluster_resources()
    report["cluster"] = {"CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0)}
    opts = deployment_options(config, cluster_has_gpus=resources.get("GPU", 0) > 0)
    gpus_needed = sum(opts[model_deployment_name(m.name)]["ray_actor_options"]["num_gpus"] * expected_replicas(m)
                      for m in config.models)
    report["deployments"] = {name: {"ray_actor_options": o["ray_actor_options"],
                                    "num_replicas": o.get("num_replicas"), "max_ongoing_requests":
                                    o["max_ongoing_requests"], "max_queued_requests": o["max_queued_requests"]}
                             for name, o in opts.items()}
    report["expected_replicas"] = {m.name: expected_replicas(m) for m in config.models}
    from ray.serve.context import _get_global_client

    started_serve = _get_global_client(raise_if_no_controller_running=False) is None
    try:
        if gpus_needed > resources.get("GPU", 0) + 1e-9:
            raise RuntimeError(f"the config needs {gpus_needed:g} GPUs, the Ray cluster has "
                               f"{resources.get('GPU', 0):g}; on a host without CUDA pass --num-gpus 1 (a logical GPU)")
        serve.start(http_options={"host": "127.0.0.1", "port": port})  # joins a running Serve (keeps its port)
        http_port = _get_global_client().http_config.port
        t0 = time.perf_counter()
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
        report["deploy_s"] = round(time.perf_counter() - t0, 1)
        url = f"http://127.0.0.1:{http_port}{config.route_prefix.rstrip('/')}"
        report["replicas_start"] = snapshot(config, config.app_name)
        report["gpu_available_after_deploy"] = ray.available_resources().get("GPU", 0)

        plan = request_plan(config.models, requests, seed, steps)
        headers = {"Accept": "application/json"}
        key = api_key or next(iter(config.security.effective_api_keys()), None)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        poller = GpuPoller(poll_interval_s).start()
        try:
            records, wall = asyncio.run(run_load(url, plan, concurrency, duration_s, headers, request_timeout_s))
        finally:
            poller.stop()
        report["load"] = {"planned": len(plan), "sent": len(records), "wall_s": round(wall, 1),
                          "images_per_s": round(sum(r.get("images", 0) for r in records) / wall, 3) if wall else 0}
        report["by_model"] = summarize(records, config.model_names)
        time.sleep(2)  # let Serve's controller see any replica that died at the very end
        report["replicas_end"] = snapshot(config, config.app_name)
        pids = {r["pid"]: f"{name}/{r['replica']}" for name, m in report["replicas_end"]["models"].items()
                for r in m["replicas"]}
        pids.update({r["pid"]: f"{name}/{r['replica']}" for name, m in report["replicas_start"]["models"].items()
                     for r in m["replicas"]})
        report["nvidia_smi"] = poller.report(pids)
        report["requests"] = records
        outcomes = [r["outcome"] for r in records]
        report["totals"] = {k: outcomes.count(k) for k in
                            ("ok", "capacity", "backpressure", "oom", "error_5xx", "error_4xx", "transport")}
        report["clean_rejections"] = [{"model": r["model"], "size": f"{r['width']}x{r['height']}",
                                       "num_images": r["num_images"], "status": r["status"], "kind": r["code"],
                                       "message": r["message"]} for r in records if r["outcome"] == "capacity"]
        report["rejections_exercised"] = bool(report["clean_rejections"])
        replicas = [r for m in report["replicas_start"]["models"].values() for r in m["replicas"]]
        report["budgets_enforced"] = bool(replicas) and all(
            str(r["device"]).startswith("cuda") and r["vram_budget_bytes"] for r in replicas) and all(
            m.engine.memory.enforce_budget for m in config.models)
        for name, m in report["by_model"].items():
            m["vram_budget_bytes"] = sorted({r["vram_budget_bytes"] for r in
                                             report["replicas_start"]["models"][name]["replicas"]}, key=str)
        report["passed"], report["failures"] = verdict(report)
    except Exception as err:  # noqa: BLE001 - a proof that could not run failed: still write what we have
        import traceback

        report["passed"], report["failures"] = False, [f"the proof did not complete: {type(err).__name__}: {err}"]
        report["traceback"] = traceback.format_exc()
    finally:
        if logs_dir:
            copy_serve_logs(logs_dir)
        if started_serve:
            serve.shutdown()
        elif ray.is_initialized():
            serve.delete(config.app_name)
        if started_ray:
            ray.shutdown()
    return report


def copy_serve_logs(dest: str) -> None:
    """Serve's controller/proxy/replica logs of this Ray session (the GPU host is gone after the run)."""
    try:
        import ray

        logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")
        shutil.copytree(logs, dest, dirs_exist_ok=True)
    except Exception as err:  # noqa: BLE001
        log.warning("could not copy the Serve logs: %s", err)


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="serving YAML, e.g. configs/serve-four-replicas-h100.yaml")
    p.add_argument("--requests", type=int, default=160, help="requests in the plan (models in turn)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--duration-s", type=float, help="stop sending new requests after this long")
    p.add_argument("--seed", type=int, default=0, help="seed of the request plan")
    p.add_argument("--steps", default="4,6,8", help="comma-separated step counts to draw from")
    p.add_argument("--port", type=int, default=8012, help="HTTP port of the Serve proxy it starts")
    p.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--num-gpus", type=int, help="GPUs of the local Ray (default: detected; 1 on a CPU host gives "
                   "a logical GPU for the smoke test)")
    p.add_argument("--vram-budget-gib", type=float, help="override every model's memory.vram_budget_gib")
    p.add_argument("--api-key", help="Bearer key (default: the config's first key, if any)")
    p.add_argument("--timeout-s", type=float, default=900, help="client timeout per request")
    p.add_argument("--poll-s", type=float, default=0.5, help="nvidia-smi polling interval")
    p.add_argument("--logs", help="copy Serve's logs of the run into this folder")
    p.add_argument("-o", "--out", help="write the JSON report here (a folder: replica-proof.json in it)")


def run_from_args(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from core.config import format_validation_error
    from serving.config import load_serving_config

    try:
        config = load_serving_config(args.config)
        if args.vram_budget_gib is not None:
            for m in config.models:
                m.engine.memory.vram_budget_gib = args.vram_budget_gib
    except (ValidationError, ValueError, OSError) as err:
        print(f"error: {args.config}: {format_validation_error(err)}", file=sys.stderr)
        return 2
    report = run_proof(config, requests=args.requests, concurrency=args.concurrency, duration_s=args.duration_s,
                       seed=args.seed, steps=[int(s) for s in args.steps.split(",")], port=args.port,
                       address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus, api_key=args.api_key,
                       request_timeout_s=args.timeout_s, poll_interval_s=args.poll_s, config_path=args.config,
                       logs_dir=args.logs)
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        path = os.path.join(args.out, "replica-proof.json") if os.path.isdir(args.out) else args.out
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    brief = {k: report.get(k) for k in ("passed", "failures", "totals", "rejections_exercised", "budgets_enforced",
                                        "load")}
    brief["by_model"] = {n: {k: m[k] for k in ("outcomes", "rejected_sizes", "largest_served",
                                               "peak_vram_allocated_bytes", "vram_budget_bytes")}
                         for n, m in report.get("by_model", {}).items()}
    brief["nvidia_smi"] = report.get("nvidia_smi")
    if "traceback" in report:
        print(report["traceback"], file=sys.stderr)
    print(json.dumps(brief, indent=1, default=str))
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replica_proof", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
