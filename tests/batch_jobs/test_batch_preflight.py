"""Batch jobs fail fast on resources the cluster lacks, and always leave an errors dataset to read."""
from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_jobs.runner import run_batch
from core.preflight import ResourceError

pytestmark = pytest.mark.integration
JOB = {"engine": {"name": "tiny-sd", "source": "embedded:tiny-sd", "device": "cpu",
                  "optimization": {"warmup_steps": 0}},
       "defaults": {"steps": 1}, "batch_size": 4}


def prompts(tmp_path, n: int = 3) -> str:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "prompt": [f"a fox {i}" for i in range(n)]}), path)
    return str(path)


def test_half_a_gpu_without_gpus_fails_in_seconds(ray_cluster, tmp_path):
    from batch_jobs.config import BatchJobConfig

    t0 = time.monotonic()
    with pytest.raises(ResourceError) as err:
        run_batch(prompts(tmp_path), str(tmp_path / "out"), BatchJobConfig.model_validate(JOB), num_gpus=0.5,
                  progress=False)
    assert time.monotonic() - t0 < 30
    assert "needs 0.5 GPU" in str(err.value) and "--num-gpus" in str(err.value)


def test_errors_dataset_exists_and_is_empty_when_no_row_failed(ray_cluster, tmp_path):
    import pandas as pd

    from batch_jobs.config import BatchJobConfig

    out = tmp_path / "out"
    summary = run_batch(prompts(tmp_path), str(out), BatchJobConfig.model_validate(JOB), progress=False)
    assert summary["status"] == "complete" and summary["failed_rows"] == 0
    errors = pd.read_parquet(out / "errors")
    assert len(errors) == 0 and {"id", "prompt", "error", "error_kind"} <= set(errors.columns)
    assert len(pd.read_parquet(out / "data")) == 3
