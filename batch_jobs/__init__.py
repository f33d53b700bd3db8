"""batch_jobs: Ray Data batch generation over Parquet prompt sets (docs/batch.md).

Owns the job config, the prompt-set scan, row <-> request translation, the map_batches UDF holding one engine
per actor, the Parquet/files sink with resume, and the batch CLI/benchmark. May import core and ray; never serving,
sdserve or benchmarks (tests/test_import_cycles.py enforces it). Importing this package does not import Ray or
torch.
"""
from __future__ import annotations


def run_batch(*args, **kwargs):
    """See batch_jobs.runner.run_batch."""
    from batch_jobs.runner import run_batch as _run

    return _run(*args, **kwargs)


__all__ = ["run_batch"]
