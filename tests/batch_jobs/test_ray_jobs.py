"""`ray job submit --working-dir . -- sdserve batch ...` through the Ray Jobs API, on a `ray start --head`
cluster of our own (free ports, its own temp dir; only that cluster is stopped)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.free_ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head_node(sdserve_cache_dir):
    temp = tempfile.mkdtemp(prefix="rj")  # short: Ray's unix socket paths must stay < 108 chars
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port", "metrics-export-port")}
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", "--block", "--num-cpus", "2", "--temp-dir", temp,
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1"]
    cmd += [f"--{name}={port}" for name, port in ports.items()]
    # --block: the cluster lives as long as this process; terminating it stops only this cluster.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled",  # a private test cluster
                                 # SIGTERM stops it at once: Ray 2.60 otherwise drains the node first, up to 30 s
                                 # (the job's leftover workers kept it waiting past the 15 s below every time)
                                 "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                                 "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"},  # sdserve
                            start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    from ray.job_submission import JobSubmissionClient

    try:
        client, deadline = None, time.time() + 90
        while client is None and time.time() < deadline:
            assert proc.poll() is None, "ray start --head exited"
            try:
                client = JobSubmissionClient(url)
                client.list_jobs()
            except Exception:  # noqa: BLE001 - dashboard not up yet
                client = None
                time.sleep(0.25)
        assert client is not None, "the Ray dashboard (Jobs API) never came up"
        yield client
    finally:
        proc.terminate()  # `ray start --block` stops the processes of this cluster on SIGTERM
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        shutil.rmtree(temp, ignore_errors=True)


def test_submit_batch_job_with_working_dir(head_node, tmp_path):
    from ray.job_submission import JobStatus

    from sdserve.cli import main

    prompts, out = tmp_path / "prompts.parquet", tmp_path / "out"
    assert main(["make-prompts", "12", str(prompts), "--steps", "2"]) == 0
    job_id = head_node.submit_job(
        entrypoint=f"sdserve batch {prompts} {out} --config configs/batch-tiny.yaml --batch-size 4 --no-progress",
        runtime_env={"working_dir": str(REPO), "excludes": [".git", ".venv", "tests"],
                     "env_vars": {"SDSERVE_CACHE_DIR": os.environ["SDSERVE_CACHE_DIR"], "HF_HUB_OFFLINE": "1"}})
    deadline = time.time() + 240
    while time.time() < deadline:
        status = head_node.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(0.25)
    logs = head_node.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "12 rows = 12 ok + 0 failed + 0 skipped" in logs
    data = pq.read_table(out / "data")
    assert data.num_rows >= 12 and len(set(data["id"].to_pylist())) == 12
