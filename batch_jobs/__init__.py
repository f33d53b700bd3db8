"""Ray Data batch generation over Parquet prompt sets. Importing this package does not import Ray or torch."""
from __future__ import annotations


def run_batch(*args, **kwargs):
    """See batch_jobs.runner.run_batch."""
    from batch_jobs.runner import run_batch as _run

    return _run(*args, **kwargs)


__all__ = ["run_batch"]
