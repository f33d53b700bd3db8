"""The job store's contract, passed by both backends: SQLite (backend local, a real file) and Redis (a real
redis-server). Records, atomic updates, queue order, bounds, cancel flags, leases, recovery after kill -9,
retention. No Ray: the store is plain Python (the worker's `recover` runs without an event loop)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from serving.jobs.config import JobsConfig
from serving.jobs.states import TERMINAL, JobRejected, JobStatus
from serving.jobs.store import JobStore

BACKENDS = ["local", "redis"]


@pytest.fixture(params=BACKENDS)
def jobs_cfg(request, tmp_path):
    """A factory: JobsConfig for the backend, fresh namespace per test (own SQLite file / own Redis prefix)."""
    prefix = f"contract-{os.getpid()}-{time.time_ns()}"

    def make(ns: str = "", **kw) -> JobsConfig:
        base = {"backend": request.param, "result_store": str(tmp_path / f"results{ns}"), "lease_s": 1.0}
        if request.param == "redis":
            base.update(redis_url=request.getfixturevalue("redis_url"), queue_name=prefix + ns)
        else:
            base["database"] = str(tmp_path / "state" / f"jobs{ns}.sqlite3")
        return JobsConfig(**{**base, **kw})

    return make


def test_create_get_update_with_expectations(jobs_cfg):
    store = JobStore(jobs_cfg())
    rec = store.create({"prompt": "a"}, owner="key-1")
    got = store.get(rec["id"])
    assert got["status"] == JobStatus.QUEUED == "queued" and got["owner"] == "key-1"
    assert got["request"] == {"prompt": "a"}
    assert store.update(rec["id"], expect=[JobStatus.RUNNING], progress={"step": 1}) is None  # not running: no write
    assert store.get(rec["id"])["progress"] is None
    up = store.update(rec["id"], expect=[JobStatus.QUEUED], status=JobStatus.RUNNING, attempts=1)
    assert up["status"] == "running" and store.get(rec["id"])["attempts"] == 1
    store.request_cancel(rec["id"])
    store.update(rec["id"], progress={"step": 2, "total": 4})  # a progress write never clears the cancel flag
    assert store.cancel_requested(rec["id"]) and not store.cancel_requested(store.create({"p": 1}, None)["id"])
    assert store.get("job-missing") is None and store.update("job-missing", status="failed") is None


def test_queue_is_fifo_and_positions_count_waiting_jobs(jobs_cfg):
    store = JobStore(jobs_cfg())
    ids = [store.create({"i": i}, None)["id"] for i in range(4)]
    assert [store.queue_position(store.get(j)) for j in ids] == [0, 1, 2, 3]
    assert store.records.claim(30) == ids[0]
    assert store.records.queued_count() == 3 and store.queue_position(store.get(ids[1])) == 0
    assert [store.records.claim(30) for _ in range(3)] == ids[1:]
    assert store.records.claim(30) is None


def test_queue_bound_and_per_key_quota(jobs_cfg):
    store = JobStore(jobs_cfg(max_queued=3))
    for _ in range(3):
        store.create({}, None)
    with pytest.raises(JobRejected) as full:
        store.create({}, None)
    assert full.value.status == 503 and full.value.code == "queue_full"
    store.records.claim(30)  # a claimed job no longer waits: room for one more
    store.create({}, None)

    store2 = JobStore(jobs_cfg("-quota"))
    mine = [store2.create({}, "key-a", quota=2)["id"] for _ in range(2)]
    with pytest.raises(JobRejected) as over:
        store2.create({}, "key-a", quota=2)
    assert over.value.status == 429 and over.value.code == "job_quota_exceeded"
    store2.create({}, "key-b", quota=2)  # another key has its own quota
    store2.update(mine[0], status=JobStatus.SUCCEEDED, finished_at=time.time())
    store2.create({}, "key-a", quota=2)  # a finished job frees its slot


def test_lapsed_lease_is_requeued_then_failed_bounded(jobs_cfg):
    from serving.jobs.runner import JobWorker

    cfg = jobs_cfg(max_retries=1)
    worker = JobWorker(cfg, {}, "tiny-sd")  # no event loop: nothing consumes, we play the dying worker
    store = worker.store
    rec = store.create({"prompt": "x"}, None)
    for attempt in (1, 2):
        assert store.records.claim(0.01) == rec["id"]  # a worker claims it (a 10 ms lease) ...
        store.update(rec["id"], status=JobStatus.RUNNING, attempts=attempt)
        deadline = time.time() + 10  # ... and dies: its lease lapses
        while not (expired := store.records.expired_leases()) and time.time() < deadline:
            time.sleep(0.01)
        assert expired == [rec["id"]]
        assert store.records.expired_leases() == []  # each lapsed lease goes to one recoverer
        worker.recover(rec["id"])
    got = store.get(rec["id"])
    assert got["status"] == "failed" and "worker lost" in got["error"] and got["attempts"] == 2, got
    assert store.records.claim(1) is None  # not queued again


_KILLED_SERVER = textwrap.dedent("""
    import json, os, signal, sys, time
    from serving.jobs.config import JobsConfig
    from serving.jobs.store import JobStore
    store = JobStore(JobsConfig.model_validate(json.loads(sys.argv[1])))
    ids = {k: [store.create({"prompt": k + str(i)}, None)["id"] for i in range(n)]
           for k, n in (("finished", 1), ("running", 2), ("queued", 3))}
    done = store.records.claim(60)
    store.update(done, status="running", attempts=1, started_at=time.time())
    store.write_result(done, {"images": [], "seeds": [7]})
    store.update(done, status="succeeded", finished_at=time.time(), seeds=[7])
    store.records.release(done)
    for j in ids["running"]:
        assert store.records.claim(0.5) == j
        store.update(j, status="running", attempts=1, started_at=time.time(), progress={"step": 3, "total": 9})
    print(json.dumps(ids), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no close: as `kill -9`
""")


def test_kill_9_then_restart_every_job_answers(jobs_cfg):
    """A server process with finished, running and queued jobs is killed with SIGKILL; a new one opens the
    store: every id answers, the finished one with its result, the running ones queued again (attempt counted)."""
    from serving.jobs.runner import JobWorker

    cfg = jobs_cfg(max_retries=2, lease_s=0.5)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_SERVER, cfg.model_dump_json()], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    import json

    ids = json.loads(proc.stdout)
    worker = JobWorker(cfg, {}, "tiny-sd")  # the restarted server's worker (its keeper's work, done by hand)
    store = worker.store
    assert all(store.get(j) is not None for group in ids.values() for j in group)
    fin = store.get(ids["finished"][0])
    assert fin["status"] == "succeeded" and store.read_result(fin["id"])["seeds"] == [7]
    deadline = time.time() + 10
    reaped: list[str] = []
    while len(reaped) < 2 and time.time() < deadline:
        reaped += store.records.expired_leases()
        time.sleep(0.05)
    assert sorted(reaped) == sorted(ids["running"])
    for j in reaped:
        worker.recover(j)
    for j in ids["running"]:
        rec = store.get(j)
        assert rec["status"] == "queued" and rec["attempts"] == 1, rec
    # Queue order after the restart: the interrupted jobs (submitted first) run before the never-started ones.
    order = [store.records.claim(30) for _ in range(5)]
    assert order == ids["running"] + ids["queued"]


def test_retention_by_age_and_total_bytes(jobs_cfg):
    cfg = jobs_cfg(retention_s=3600, result_max_bytes=2500)
    store = JobStore(cfg)
    recs = [store.create({"i": i}, None) for i in range(4)]
    for i, rec in enumerate(recs):
        store.write_result(rec["id"], {"pad": "x" * 1000})
        store.update(rec["id"], status=JobStatus.SUCCEEDED, finished_at=time.time())
        path = store._path(rec["id"])
        age = 7200 if i == 0 else 40 - i  # the first is past retention; the others 39, 38, 37 s old
        os.utime(path, (time.time() - age, time.time() - age))
    out = store.sweep()
    assert out["results_by_age"] == 1 and out["results_by_bytes"] == 1  # 3 x ~1 kB left > 2500 B: oldest goes
    assert [store.read_result(r["id"]) is not None for r in recs] == [False, False, True, True]
    later = store.sweep(now=time.time() + 7200)  # two hours on: every finished record and result is past it
    assert later["results_by_age"] == 2
    if cfg.backend == "local":  # Redis records expire by TTL instead
        assert later["records"] == 4 and all(store.get(r["id"]) is None for r in recs)


def test_statuses_have_one_definition():
    assert TERMINAL == {"succeeded", "failed", "cancelled"}
    assert JobStatus("cancelling") is JobStatus.CANCELLING and "cancelling" not in TERMINAL
