"""What the replica proof (benchmarks/replica_proof.py) records about the deployment: every model replica (Ray's
actor table and each replica's info()), GPU memory as nvidia-smi sees it, and the versions it ran with.

Stdlib-only at import (Ray is imported when used): `sdserve bench replicas --help` stays cheap.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from typing import Any

log = logging.getLogger("replica_proof")
REPLICA_PREFIX = "SERVE_REPLICA::"


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


def _status_name(status: Any) -> str:
    """Serve's status enums as their plain value ("HEALTHY", "RUNNING"), for the JSON report."""
    return str(getattr(status, "value", status))


def snapshot(config, app: str) -> dict[str, Any]:
    """Per model: Serve's deployment status and replica states, and every replica (actor table + info())."""
    from ray import serve

    from serving.builder import model_deployment_name

    status = serve.status().applications.get(app)
    out: dict[str, Any] = {"app_status": _status_name(status.status) if status else "MISSING", "models": {}}
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
            "status": _status_name(ds.status) if ds else "MISSING",
            "replica_states": {_status_name(k): v for k, v in (ds.replica_states or {}).items()} if ds else {},
            "replicas": replicas}
    return out


def snapshot_replicas(snap: dict[str, Any]) -> list[tuple[str, dict]]:
    """(model name, replica) for every replica of a `snapshot`."""
    return [(name, r) for name, m in snap["models"].items() for r in m["replicas"]]


def replica_pids(*snaps: dict[str, Any]) -> dict[int, str]:
    """pid -> "model/replica" over the snapshots; where two name one pid, the later snapshot wins."""
    return {r["pid"]: f"{name}/{r['replica']}" for snap in snaps for name, r in snapshot_replicas(snap)}


def expected_replicas(model) -> int:
    """The replicas the model's deployment config asks for at the start."""
    d = model.deployment
    if d.num_replicas is not None:
        return d.num_replicas
    if d.autoscaling_config is not None:
        a = d.autoscaling_config
        return a.initial_replicas if a.initial_replicas is not None else a.min_replicas
    return 1


# ---------------------------------------------------------------------------------------------- nvidia-smi
def query_nvidia_smi(exe: str, what: str, timeout_s: float, check: bool = True) -> list[list[str]]:
    """Rows of `nvidia-smi --query-{what}` as CSV cells. check: raise on a non-zero exit (else parse what came)."""
    out = subprocess.run([exe, f"--query-{what}", "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=timeout_s)
    if check and out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or out.stdout.strip())
    return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


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

    def sample(self) -> None:
        try:
            for pid, used in query_nvidia_smi(self.exe, "compute-apps=pid,used_memory", timeout_s=10):
                if pid.isdigit() and used.isdigit():
                    self.per_pid[int(pid)] = max(self.per_pid.get(int(pid), 0), int(used))
            for idx, used, total in query_nvidia_smi(self.exe, "gpu=index,memory.used,memory.total", timeout_s=10):
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


def env_info() -> dict[str, Any]:
    """Versions and the GPU, without touching CUDA here (a CUDA context in the driver would hold GPU memory)."""
    from importlib.metadata import version

    import ray

    info: dict[str, Any] = {"ray": ray.__version__, "torch": version("torch"), "diffusers": version("diffusers"),
                            "host_cpus": os.cpu_count()}
    exe = shutil.which("nvidia-smi")
    if exe:
        # check=False: the versions are context, not the proof; whatever a failing nvidia-smi printed is kept
        rows = query_nvidia_smi(exe, "gpu=index,name,memory.total,driver_version", timeout_s=30, check=False)
        info["gpus"] = [dict(zip(("index", "name", "total_mib", "driver"), row)) for row in rows]
    return info
