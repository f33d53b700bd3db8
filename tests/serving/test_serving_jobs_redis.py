"""Async jobs on the Redis backend (a real redis-server on a free port): many jobs, cancel, the ingress replica
killed mid-job (the job is recovered from Redis and completes), bad ids. Bounded retries of lost jobs and the
store's other guarantees: tests/serving/test_job_store.py (both backends)."""
from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.integration
from serving.jobs.states import TERMINAL


@pytest.fixture
def rc(redis_jobs_url):
    with httpx.Client(base_url=redis_jobs_url, timeout=60) as c:
        yield c


def get(rc, job_id):
    """GET a job, riding out the seconds when the ingress is being replaced."""
    deadline = time.time() + 60
    while True:
        try:
            r = rc.get(f"/v1/jobs/{job_id}")
            if r.status_code == 200:
                return r.json()
            # While the only ingress is replaced the proxy answers 5xx (or a routeless 404); ours say job_not_found.
            assert r.status_code in (404, 500, 502, 503, 504) and "job_not_found" not in r.text, (r.status_code, r.text)
        except httpx.TransportError:
            pass
        assert time.time() < deadline, f"job {job_id}: ingress unreachable"
        time.sleep(0.1)


def wait_for(rc, job_id, pred, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rec = get(rc, job_id)
        if pred(rec):
            return rec
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached the state: {rec}")


def test_redis_jobs_complete_with_monotonic_progress(rc, redis_url):
    import redis

    ids = []
    for i in range(6):
        r = rc.post("/v1/jobs", json={"prompt": f"redis job {i}", "seed": 700 + i, "steps": 8})
        assert r.status_code == 202 and r.json()["status"] == "queued"
        ids.append(r.json()["id"])
    assert redis.Redis.from_url(redis_url).exists(f"sdserve-test:job:{ids[-1]}")  # the record lives in Redis
    seen = {j: [] for j in ids}
    pending, positions = set(ids), []
    deadline = time.time() + 90
    while pending and time.time() < deadline:
        for j in list(pending):
            rec = get(rc, j)
            if rec["progress"]:
                seen[j].append(rec["progress"]["step"])
            if rec["status"] == "queued":
                positions.append(rec["queue_position"])
            if rec["status"] in TERMINAL:
                assert rec["status"] == "succeeded", rec
                pending.discard(j)
        time.sleep(0.02)
    assert not pending and all(p >= 0 for p in positions)
    for i, j in enumerate(ids):
        assert seen[j] == sorted(seen[j]) and seen[j][-1] == 8, seen[j]
        rec = get(rc, j)
        assert rec["created_at"] <= rec["started_at"] <= rec["finished_at"] and rec["attempts"] == 1
        res = rc.get(f"/v1/jobs/{j}/result").json()
        assert res["seeds"] == [700 + i] and res["images"][0]["b64_json"]


def test_redis_cancel_queued_and_running(rc):
    slow = {"prompt": "slow", "steps": 400, "seed": 1, "width": 512, "height": 512}  # ~tens of seconds:
    # at 256² a running job sometimes finished before its cancel arrived on the 2-core CI box
    running = [rc.post("/v1/jobs", json=slow).json()["id"] for _ in range(2)]  # fills both slots
    queued = rc.post("/v1/jobs", json=slow).json()["id"]
    for j in running:
        wait_for(rc, j, lambda r: r["status"] == "running" and r["progress"])
    rec = get(rc, queued)
    assert rec["status"] == "queued" and rec["queue_position"] == 0
    assert rc.delete(f"/v1/jobs/{queued}").json()["status"] == "cancelled"
    for j in running:
        rc.delete(f"/v1/jobs/{j}")
    for j in running:
        rec = wait_for(rc, j, lambda r: r["status"] in TERMINAL, timeout=60)
        assert rec["status"] == "cancelled" and rec["progress"]["step"] < 400
    # A freed slot must not run the cancelled job. The queue is FIFO: once a job submitted after it has finished,
    # the dispatcher has passed the cancelled one.
    marker = rc.post("/v1/jobs", json={"prompt": "after the cancels", "steps": 2}).json()["id"]
    assert wait_for(rc, marker, lambda r: r["status"] in TERMINAL)["status"] == "succeeded"
    rec = get(rc, queued)
    assert rec["status"] == "cancelled" and rec["started_at"] is None
    assert rc.get(f"/v1/jobs/{queued}/result").status_code == 409


def test_redis_job_survives_ingress_kill(rc, ray_cluster):
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::rjobs#ingress#")]
    assert len(names) == 1
    ingress = ray.get_actor(names[0], namespace="serve")
    j = rc.post("/v1/jobs", json={"prompt": "survive the ingress", "steps": 300, "seed": 5}).json()["id"]
    later = [rc.post("/v1/jobs", json={"prompt": f"later {i}", "steps": 4}).json()["id"] for i in range(3)]
    wait_for(rc, j, lambda r: r["status"] == "running" and r["progress"])
    ray.kill(ingress, no_restart=True)
    # The replacement ingress finds the lapsed lease in Redis, queues the job again and runs it to the end.
    rec = wait_for(rc, j, lambda r: r["status"] in TERMINAL, timeout=90)
    assert rec["status"] == "succeeded" and rec["attempts"] == 2, rec
    for k in later:  # queued (or running) behind it: none is lost
        rec = wait_for(rc, k, lambda r: r["status"] in TERMINAL, timeout=60)
        assert rec["status"] == "succeeded", rec
    assert rc.get(f"/v1/jobs/{j}/result").json()["seeds"] == [5]


def test_redis_bad_ids_and_bodies(rc):
    assert rc.get("/v1/jobs/job-doesnotexist").status_code == 404
    assert rc.delete("/v1/jobs/nope").status_code == 404
    assert rc.get("/v1/jobs/job-" + "0" * 200 + "/result").status_code == 404
    r = rc.post("/v1/jobs", json={"prompt": "x", "steps": 0})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]
    r = rc.post("/v1/jobs", json={"prompt": "x", "steps": 401})  # the model's limit, checked at submit
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"] and "id" not in r.json()
