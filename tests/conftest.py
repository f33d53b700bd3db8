"""Suite-wide fixtures, kept generic: a per-session cache dir, no model hub, and GPU tests that skip cleanly."""
from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    # There is no model hub on CI or a fresh machine: fail fast instead of waiting on the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Test clusters are local and private. Ray 2.60 switches to token auth when ~/.ray/auth_token exists (left by
    # any earlier `ray start`); a cluster started without the token then cannot be joined. One mode for the suite.
    os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="session")
def sdserve_cache_dir(tmp_path_factory) -> str:
    """One cache dir per test session (embedded models are written once, then loaded from here)."""
    path = str(tmp_path_factory.mktemp("sdserve-cache"))
    os.environ["SDSERVE_CACHE_DIR"] = path  # EngineConfig's default, also seen by subprocesses
    return path


def pytest_sessionfinish(session, exitstatus):
    # Inductor's compile-worker pool (started by the CPU compile tests) is otherwise torn down during interpreter
    # finalization, where it once crashed the process (SIGSEGV) after every test had passed.
    import sys

    if "torch._inductor.async_compile" in sys.modules:
        sys.modules["torch._inductor.async_compile"].shutdown_compile_workers()
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


_EXIT_STATUS = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # The full suite once died with SIGSEGV in interpreter finalization after every test had passed and the summary
    # was printed (native threads of Ray/gRPC/torch torn down in an arbitrary order), which turned a green run red.
    # Results are final by now: leave with pytest's own exit status, skipping finalization.
    import sys

    status = config.stash.get(_EXIT_STATUS, None)
    if status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch  # only when a gpu test was collected

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in gpu_items:
        item.add_marker(skip)
