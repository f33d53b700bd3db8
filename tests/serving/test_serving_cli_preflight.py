"""`sdserve serve` on a machine without the resources a config asks for: fails in seconds naming the keys; with
--no-resource-check (an autoscaling cluster) it warns while replicas stay pending, and Ctrl-C still stops it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.free_ports import free_port as _free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "serve-two-models-h100.yaml")
pytestmark = pytest.mark.integration


def sdserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdserve", "serve", CONFIG, "--port", str(_free_port()), *args]


def env() -> dict[str, str]:
    # Serve states why a replica is pending once it has waited RAY_SERVE_SLOW_STARTUP_WARNING_S, checked every
    # RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S (30 s each by default); 1 s here, so the test waits for the message,
    # not for Serve's default patience; `sdserve serve` asks Serve about pending replicas every second (10 s by
    # default, serving/cli.py _pending_check_s).
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_SERVE_SLOW_STARTUP_WARNING_S": "1",
            "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S": "1", "SDSERVE_PENDING_CHECK_S": "1"}


def test_gpu_config_on_cpu_fails_fast_naming_the_key():
    t0 = time.monotonic()
    proc = subprocess.run(sdserve(), capture_output=True, text=True, timeout=180, env=env(), cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("error: "))
    assert "GPU" in line and "models[0].deployment.num_gpus" in line and "--no-resource-check" in line
    assert time.monotonic() - t0 < 120  # Ray's start is most of it; nothing waits for a GPU


@pytest.mark.slow
def test_pending_replicas_are_reported_and_ctrl_c_stops(tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(sdserve("--no-resource-check"), stdout=fh, stderr=subprocess.STDOUT, text=True,
                                env=env(), cwd=ROOT)
        try:
            deadline = time.time() + 240
            while "warning: model-" not in log.read_text():
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)  # poll interval: the log line is the event
            warning = next(ln for ln in log.read_text().splitlines() if ln.startswith("warning: model-"))
            assert "GPU" in warning or "resources" in warning.lower(), warning
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                assert proc.wait(120) in (0, 130)
            finally:
                if proc.poll() is None:
                    proc.kill()
