"""The open-loop load benchmark (benchmarks/load.py) against the real Serve app over HTTP: batch sizes from
X-Batch-Size, queue times from Server-Timing, every request accounted for."""
from __future__ import annotations

import json

import pytest

from tests.serving.conftest import KEYS

pytestmark = pytest.mark.integration


def test_load_benchmark_over_http_records_batch_sizes_and_queue_times(serve_url, tmp_path):
    from benchmarks.load import main

    argv = ["--url", serve_url, "--api-key", KEYS[0], "--model", "tiny-sd", "--admission", "batch",
            "--profiles", "uniform", "--sizes", "64x64", "--steps", "2", "--capacity-rps", "4", "--rates", "1.5",
            "--duration-s", "2", "--drain-timeout-s", "300", "--unloaded-requests", "2", "--no-saturation",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    rec = json.loads(path.read_text())
    assert (rec["target"], rec["engine_api"], rec["model"], rec["admission"]) == ("http", "http", "tiny-sd", "batch")
    assert rec["capacity_from"] == "given" and rec["rate_rps"] == 6.0 and rec["recompiles"] is None
    c = rec["counts"]
    assert c["sent"] == len(rec["requests"]) and c["ok"] == c["sent"] and c["lost"] == 0, c
    if c["ok"]:
        assert sum(rec["batch_size_histogram"].values()) == c["ok"]  # every answer carried X-Batch-Size
        assert rec["queue_p99_s"] is not None and rec["queue_p99_s"] >= 0
    assert rec["unloaded_p50_s"] > 0 and len(rec["unloaded_s"]["64x64"]) == 2
