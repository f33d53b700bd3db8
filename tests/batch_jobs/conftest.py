"""One local Ray (2 CPUs) for the batch_jobs tests that run Ray Data in this process: starting and stopping one
costs seconds, and each test's run starts its own engine actors anyway. It stops after this directory's last test
(pytest has no per-directory scope for folders without __init__.py), so other directories start their own."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
_cleanups: list = []


@pytest.fixture(scope="session")
def ray_cluster(sdserve_cache_dir) -> str:
    """The local Ray's GCS address (for a driver in a subprocess to join)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    _cleanups.append(ray.shutdown)
    return ray.get_runtime_context().gcs_address


@pytest.hookimpl(trylast=True)  # after the item's own fixture finalizers
def pytest_runtest_teardown(item, nextitem):
    if nextitem is None or HERE not in Path(nextitem.path).parents:
        while _cleanups:
            _cleanups.pop()()
