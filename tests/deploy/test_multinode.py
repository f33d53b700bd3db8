"""A real two-node Ray cluster on one machine: `ray start --head`, then `ray start --address`, each node with one
logical GPU (engines run on CPU, `device: cpu`, with the embedded tiny-sd model).

- The Serve app, deployed with `serve deploy` from a Serve config in the RayService's format (import_path
  serving.app:app_builder + a ServingConfig in `args`), spreads its two 0.5-GPU replicas over both nodes.
- A batch job (batch_jobs.run_batch, Ray Data) places its two 0.5-GPU engine actors on both nodes.
- The worker node is killed (SIGKILL of all its processes) while HTTP requests and a batch job run: Serve keeps
  answering from the head's replica (bounded client retries); the batch job (its own driver process, as
  `ray job submit` runs it) fails fast (its engine actors are not restarted: on a fixed cluster the restart could
  never be placed and the run would hang), and a resubmitted job with one actor (what the head has left) skips the
  committed rows and ends with every row exactly once.

Isolation (other Ray clusters may run on this machine): every port is picked free, each node has its own
--temp-dir (so /tmp/ray and its ray_current_cluster file are untouched), token auth is off for this cluster only,
and each `ray start --block` runs in its own session: teardown kills exactly those process groups and their
descendants (never `ray stop`, which would stop every Ray of this user).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.free_ports import free_ports as _free_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RAY_BIN = Path(sys.executable).with_name("ray")
SERVE_BIN = Path(sys.executable).with_name("serve")
APP = "sdserve"
MODEL = "tiny-sd"
MODEL_DEPLOYMENT = f"model-{MODEL}"
REQUEST = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


class RayNode:
    """One `ray start --block` in its own session; stop() kills its process group and every descendant."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        self.proc = subprocess.Popen([str(RAY_BIN), "start", "--block", *args], env=env, start_new_session=True,
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def _tree(self) -> list[int]:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """Abrupt node failure: SIGKILL to every process of the node (Ray workers have their own groups)."""
        pids = self._tree()
        for sig_target in [("group", self.proc.pid)] + [("pid", p) for p in pids]:
            try:
                if sig_target[0] == "group":
                    os.killpg(sig_target[1], signal.SIGKILL)
                else:
                    os.kill(sig_target[1], signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            pids = self._tree()
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # `ray start --block` cleans its node up on SIGTERM
                self.proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    tmp = Path(tempfile.mkdtemp(prefix="sdmn-", dir="/tmp"))  # short: Ray's unix socket paths must stay < 108
    cache = tmp_path_factory.mktemp("mn-cache")
    env = {**os.environ,
           "RAY_AUTH_MODE": "disabled",  # a ~/.ray/auth_token left by another local Ray must not apply here
           "RAY_USAGE_STATS_ENABLED": "0",
           # Teardown's SIGTERM stops a node at once (Ray 2.60 otherwise drains it first, up to 30 s).
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           # Detect the killed node within ~3 s instead of ~15 s.
           "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
           "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
           "SDSERVE_CACHE_DIR": str(cache),  # shared by both nodes, like the cluster's EFS/PVC
           "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    # The head gets 2 logical CPUs: after the worker is lost, a resume runs Ray Data's CheckpointFilter actor (it
    # holds 1 CPU for the whole run) *and* the read/write tasks there; with 1 CPU the reads never run (a hang).
    common = ["--num-gpus", "1", "--object-store-memory", str(200 * 2**20), "--disable-usage-stats"]
    p = _free_ports(10)
    gcs_port, dash_port, http_port = p[0], p[1], p[9]
    nodes: list[RayNode] = []
    saved_env = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE",)}
    try:
        nodes.append(RayNode(
            ["--head", "--port", str(gcs_port), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dash_port), "--ray-client-server-port", str(p[2]),
             "--node-manager-port", str(p[3]), "--object-manager-port", str(p[4]),
             "--dashboard-agent-listen-port", str(p[5]), "--dashboard-agent-grpc-port", str(p[6]),
             "--runtime-env-agent-port", str(p[7]), "--metrics-export-port", str(p[8]),
             "--resources", json.dumps({"head": 1}), "--temp-dir", str(tmp / "h"), "--num-cpus", "2", *common],
            env, tmp / "head.log"))
        _wait_port(gcs_port, nodes[0], 60)
        q = _free_ports(6)
        nodes.append(RayNode(
            ["--address", f"127.0.0.1:{gcs_port}", "--node-manager-port", str(q[0]),
             "--object-manager-port", str(q[1]), "--dashboard-agent-listen-port", str(q[2]),
             "--dashboard-agent-grpc-port", str(q[3]), "--runtime-env-agent-port", str(q[4]),
             "--metrics-export-port", str(q[5]), "--resources", json.dumps({"worker": 1}),
             "--temp-dir", str(tmp / "w"), "--num-cpus", "1", *common],
            env, tmp / "worker.log"))
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=f"127.0.0.1:{gcs_port}", log_to_driver=False)
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.time() < deadline, "worker node did not join: " + (tmp / "worker.log").read_text()[-2000:]
            time.sleep(0.5)
        node_ids = {}
        for n in ray.nodes():
            if n["Alive"]:
                node_ids["head" if "head" in n["Resources"] else "worker"] = n["NodeID"]
        assert ray.get_runtime_context().get_node_id() == node_ids["head"], "the driver must sit on the head"
        yield {"ray": ray, "env": env, "tmp": tmp, "cache": cache, "head": nodes[0], "worker": nodes[1],
               "node_ids": node_ids, "address": f"127.0.0.1:{gcs_port}", "dashboard": f"http://127.0.0.1:{dash_port}",
               "http": f"http://127.0.0.1:{http_port}", "http_port": http_port}
    finally:
        try:
            ray.shutdown()
            from ray.serve import context as serve_context

            serve_context._set_global_client(None)
        except Exception:  # noqa: BLE001 - teardown must go on
            pass
        for node in reversed(nodes):
            node.stop()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_port(port: int, node: RayNode, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert node.proc.poll() is None, "ray start --head exited: " + node.log.read_text()[-2000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"GCS port {port} not open after {timeout}s")


def serve_config(http_port: int) -> dict:
    """The RayService's serveConfigV2 shape, scaled to tiny-sd on CPU with logical GPUs."""
    return {
        "proxy_location": "HeadOnly",  # one HTTP port per host: the second node's proxy would collide here
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "serving.app:app_builder",
            "args": {"app_name": APP, "route_prefix": "/",
                     "models": [{"engine": {"name": MODEL, "source": "embedded:tiny-sd", "device": "cpu"},
                                 "deployment": {"num_replicas": 2, "num_gpus": 0.5, "num_cpus": 0}}]},
            "deployments": [
                # One replica per node, so both nodes serve (and a lost node's replica is not re-placed on the
                # head, leaving its 0.5 GPU to the batch job).
                {"name": MODEL_DEPLOYMENT, "max_replicas_per_node": 1},
                # The ingress lives on the head, like the proxy (the custom resource `head` marks that node).
                {"name": "ingress", "ray_actor_options": {"num_cpus": 0, "resources": {"head": 0.01}}},
            ],
        }],
    }


def _all_actors(cluster: dict, class_part: str) -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(address=cluster["dashboard"], limit=1000, raise_on_missing_output=False)
            if class_part in a.class_name]


def _alive_actors(cluster: dict, class_part: str) -> list:
    return [a for a in _all_actors(cluster, class_part) if a.state == "ALIVE"]


def _post(url: str, timeout: float = 30):
    import httpx

    return httpx.post(f"{url}/v1/generate", json=REQUEST, timeout=timeout)


def _post_with_retries(url: str, attempts: int = 8, backoff: float = 1.0):
    """The client side of a node loss: a bounded number of retries."""
    last = None
    for i in range(attempts):
        try:
            r = _post(url)
            if r.status_code == 200:
                return r, i
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except Exception as err:  # noqa: BLE001 - connection errors are retried too
            last = repr(err)
        time.sleep(backoff)
    raise AssertionError(f"no answer after {attempts} attempts: {last}")


@pytest.fixture
def wait_for_actor_pool():
    """Ray Data starts the job as soon as one pool actor is up; on a loaded 2-core machine the second (on the other
    node) may come up only after a small job is done. Make the pool start complete first, as on a real cluster."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.wait_for_min_actors_s
    ctx.wait_for_min_actors_s = 120
    yield
    ctx.wait_for_min_actors_s = saved


@pytest.fixture(scope="module")
def deployed(cluster, tmp_path_factory):
    """`serve deploy` (the CLI, through the head's dashboard) of the RayService-shaped config."""
    from ray.serve.schema import ServeDeploySchema

    cfg = serve_config(cluster["http_port"])
    ServeDeploySchema.model_validate(cfg)
    path = tmp_path_factory.mktemp("serve") / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([str(SERVE_BIN), "deploy", str(path), "-a", cluster["dashboard"]], env=cluster["env"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    from ray import serve

    deadline = time.time() + 90
    while True:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "RUNNING":
            break
        assert status is None or status.status not in ("DEPLOY_FAILED", "UNHEALTHY"), status
        assert time.time() < deadline, f"app not RUNNING: {status}"
        time.sleep(1)
    return cluster


def test_serve_replicas_spread_over_both_nodes(deployed):
    replicas = _alive_actors(deployed, f"ServeReplica:{APP}:{MODEL_DEPLOYMENT}")
    assert len(replicas) == 2
    assert {a.node_id for a in replicas} == set(deployed["node_ids"].values()), "one replica per node"
    # Both answer through the head's proxy.
    for _ in range(4):
        r = _post(deployed["http"])
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n", r.text[:200]


def _write_prompts(folder: Path, n: int, files: int, steps: int = 2) -> list[str]:
    """n rows over several Parquet files: several read blocks, so both engine actors get work."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    ids = [f"row-{i:04d}" for i in range(n)]
    per = -(-n // files)
    for f in range(files):
        part = ids[f * per:(f + 1) * per]
        pq.write_table(pa.table({"id": part, "prompt": [f"prompt {i}" for i in part], "width": [64] * len(part),
                                 "height": [64] * len(part), "steps": [steps] * len(part)}),
                       folder / f"part-{f:03d}.parquet")
    return ids


def _output_ids(output: Path) -> list[str]:
    import pyarrow.parquet as pq

    files = [f for f in (output / "data").glob("*.parquet") if not f.name.startswith((".", "_"))]
    return [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


def _batch_kwargs() -> dict:
    # 0.5 GPU per actor: each node has 0.5 left beside its Serve replica, so the two actors land one per node.
    # num_cpus 0: the nodes' single CPU stays free for Ray Data's read and write tasks.
    from batch_jobs.config import BatchJobConfig

    job = BatchJobConfig.model_validate({"engine": {"name": MODEL, "source": "embedded:tiny-sd", "device": "cpu"},
                                         "concurrency": 2, "num_gpus": 0.5, "num_cpus": 0, "batch_size": 4})
    return {"config": job, "progress": False}


def test_batch_job_uses_actors_on_both_nodes(deployed, wait_for_actor_pool, tmp_path):
    from batch_jobs.runner import run_batch

    ids = _write_prompts(tmp_path / "prompts", 48, files=8, steps=2)
    before = {a.actor_id for a in _all_actors(deployed, "GenerateImages")}
    summary = run_batch(str(tmp_path / "prompts"), str(tmp_path / "out"), **_batch_kwargs())
    assert summary["status"] == "complete", summary
    assert sorted(_output_ids(tmp_path / "out")) == sorted(ids)
    actors = [a for a in _all_actors(deployed, "GenerateImages") if a.actor_id not in before]
    assert len(actors) == 2, [(a.class_name, a.state) for a in actors]
    assert {a.node_id for a in actors} == set(deployed["node_ids"].values()), "one engine actor per node"


_DRIVER = """
import json, sys
import ray
from batch_jobs.config import BatchJobConfig
from batch_jobs.runner import run_batch

ray.init(log_to_driver=False)
assert ray.get_runtime_context().get_node_id() == sys.argv[4], "the driver must sit on the head"
try:
    summary = run_batch(sys.argv[1], sys.argv[2], config=BatchJobConfig.model_validate_json(sys.argv[3]),
                        progress=False)
except BaseException as err:
    print("RESULT " + json.dumps({"error": repr(err)[:2000]}), flush=True)
    sys.exit(1)
print("RESULT " + json.dumps({"summary": summary}), flush=True)
"""


def _run_batch_driver(cluster: dict, prompts: Path, out: Path, concurrency: int, wait_for_actors_s: int) -> dict:
    """One batch job in its own driver process, as `sdserve batch` / `ray job submit` runs it: when it ends, Ray
    ends its actors. (A failed Ray Data run only drops its actor handles; inside a long-lived driver, such as
    pytest, the failed run's engine actor on the head lived on, holding the GPU the resume needs.)"""
    config = _batch_kwargs()["config"].model_copy(update={"concurrency": concurrency})
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "PYTHONPATH": str(ROOT),
           "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": str(wait_for_actors_s)}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(prompts), str(out), config.model_dump_json(),
                           cluster["node_ids"]["head"]], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"batch driver exited {proc.returncode} without a result: {proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.timeout(300)
def test_worker_node_loss_under_load(deployed, tmp_path, request):
    url = deployed["http"]
    # 240 rows: the kill comes soon after the first committed part (16 to 112 rows were written by then on a busy
    # 2-core box; 'batch finished before the kill' fails should it ever be all of them); the rest outlasts that,
    # and the resume (one actor, ~1 s per 10 rows) is what this run's size costs
    ids = _write_prompts(tmp_path / "prompts", 240, files=15, steps=4)
    out = tmp_path / "out"

    batch_result: dict = {}

    def batch():
        try:
            batch_result.update(_run_batch_driver(deployed, tmp_path / "prompts", out, 2, 120))
        except BaseException as err:  # noqa: BLE001
            batch_result["error"] = "driver: " + repr(err)

    answers: list[tuple[float, int]] = []
    stop_load = threading.Event()
    request.addfinalizer(stop_load.set)  # also when an assertion ends the test early

    def load():
        while not stop_load.is_set():
            try:
                answers.append((time.time(), _post(url, timeout=20).status_code))
            except Exception:  # noqa: BLE001
                answers.append((time.time(), -1))
            time.sleep(0.2)

    t_batch = threading.Thread(target=batch, daemon=True)
    t_load = threading.Thread(target=load, daemon=True)
    t_batch.start()
    t_load.start()
    # Kill the worker node once an engine actor of the batch job runs there and some parts are committed (so the
    # resume has rows to skip: Ray Data's CheckpointFilter runs).
    from batch_jobs.runner import committed_ids

    worker_id = deployed["node_ids"]["worker"]
    deadline = time.time() + 90
    while True:
        if worker_id in {a.node_id for a in _alive_actors(deployed, "GenerateImages")} and committed_ids(str(out)):
            break
        assert time.time() < deadline, "batch actors never ran on both nodes"
        assert t_batch.is_alive(), f"batch finished before the kill: {batch_result}"
        time.sleep(0.2)
    killed_at = time.time()
    deployed["worker"].kill()

    # Serve: the head's replica keeps answering; a client with bounded retries always gets its image.
    for _ in range(5):
        r, _retries = _post_with_retries(url)
        assert r.status_code == 200
    deadline = time.time() + 30
    while any(n["NodeID"] == worker_id and n["Alive"] for n in deployed["ray"].nodes()):
        assert time.time() < deadline, "the killed node is still alive in the GCS"
        time.sleep(0.5)
    # Once the GCS has declared the node dead (and Serve has dropped its replica), no request fails any more: the
    # HTTP load goes on through the batch job's end and its resume below, and every answer after `settled` is 200.
    settled = time.time() + 3

    # Batch: the interrupted run fails fast (its worker-node actor died and is not restarted: a restart could never
    # be placed, and Ray Data would wait for it forever) or, had it been fast, completed.
    t_batch.join(120)
    assert not t_batch.is_alive(), "the batch job hangs after the node loss"
    # (ActorDiedError, or ActorUnavailableError when the executor sees the actor's connection drop first).
    assert "summary" in batch_result or "Actor" in batch_result["error"], batch_result
    # The resume (a new driver, like a resubmitted job) runs on what is left: the head's free 0.5 GPU, one engine
    # actor. An actor that cannot be placed fails it after 60 s with a timeout instead of a hang.
    t0 = time.time()
    resumed = _run_batch_driver(deployed, tmp_path / "prompts", out, 1, 60)
    assert "summary" in resumed, (batch_result, resumed)
    summary = resumed["summary"]
    print(f"resume: {summary['ok_rows']} rows in {time.time() - t0:.1f}s, {summary['skipped_rows']} skipped")

    while time.time() < settled + 8 or len([1 for t, _ in answers if t > settled]) < 3:  # (already, mostly)
        assert time.time() < settled + 60, "no answers after the node loss"
        time.sleep(0.5)
    stop_load.set()
    t_load.join(30)
    print(f"interrupted batch run: {batch_result}; {len(answers)} HTTP answers")
    after = [code for t, code in answers if t > settled]
    assert all(code == 200 for code in after), f"Serve not stable after the node loss: {after}"
    replicas = _alive_actors(deployed, f"ServeReplica:{APP}:{MODEL_DEPLOYMENT}")
    assert {a.node_id for a in replicas} == {deployed["node_ids"]["head"]}

    assert summary["status"] == "complete", (batch_result, summary)
    assert 0 < summary["skipped_rows"] < len(ids), summary
    written = _output_ids(out)
    assert sorted(written) == sorted(ids), "every row exactly once"
    assert summary["missing_rows"] == 0 and summary["duplicate_images"] == 0
    assert summary["total_ok_rows"] == len(ids)
