"""The "ops" app (tests/serving/conftest.py): failed-auth throttling per client address, a read budget separate
from generation, the jobs store going down (503 + Retry-After, not ready) and coming back, and
sdserve_errors_total counting 503s and cancellations (scraped from Ray's Prometheus export)."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.serving.conftest import OPS_KEYS

pytestmark = pytest.mark.integration


def ops(ops_url, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=ops_url, timeout=60, headers=headers)


def test_failed_auth_is_throttled_per_address(ops_url):
    """auth_failures: 3 per 3 s. The 4th wrong key gets 429 with Retry-After, and so does a right key from the
    same address until the window passes (a guesser learns nothing while throttled)."""
    with ops(ops_url, "wrong-key") as bad, ops(ops_url, OPS_KEYS[0]) as good:
        codes = [bad.get("/v1/models").status_code for _ in range(3)]
        assert codes == [401, 401, 401]
        r = bad.get("/v1/models")
        assert r.status_code == 429 and r.json()["error"]["code"] == "auth_throttled", r.text  # OpenAI route
        assert 1 <= int(r.headers["Retry-After"]) <= 3
        r = good.post("/v1/jobs", json={"prompt": "x"})
        assert r.status_code == 429 and r.json()["detail"]["code"] == "auth_throttled"
        deadline = time.time() + 10
        while (r := good.get("/v1/models")).status_code == 429 and time.time() < deadline:
            time.sleep(0.2)
        assert r.status_code == 200  # the window passed: the right key works again


def test_job_polling_has_its_own_budget(ops_url):
    """Generation: 6/min, burst 2. Reads: 600/min, burst 100. Polling a job never uses the generation budget."""
    with ops(ops_url, OPS_KEYS[1]) as c:
        ids = [c.post("/v1/jobs", json={"prompt": f"budget {i}", "steps": 2}).json()["id"] for i in range(2)]
        polls = [c.get(f"/v1/jobs/{ids[i % 2]}").status_code for i in range(60)]
        assert polls == [200] * 60
        r = c.post("/v1/jobs", json={"prompt": "third", "steps": 2})
        assert r.status_code == 429 and r.json()["detail"]["code"] == "rate_limited"  # generation budget spent
        assert c.get(f"/v1/jobs/{ids[0]}").status_code == 200  # reads still fine


def test_jobs_store_down_is_503_and_not_ready(ops_url, ops_redis):
    with ops(ops_url, OPS_KEYS[2]) as c:
        deadline = time.time() + 120
        while (r := c.get("/readyz")).status_code != 200 and time.time() < deadline:
            time.sleep(0.5)
        assert r.json()["jobs_store"] == "ok"
        ops_redis.stop()
        try:
            r = c.post("/v1/jobs", json={"prompt": "while redis is down", "steps": 2})
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
            assert r.json()["detail"]["code"] == "jobs_store_unavailable"  # the API's shape, not text/plain
            r = c.get("/v1/jobs/job-0123")
            assert r.status_code == 503 and r.json()["detail"]["code"] == "jobs_store_unavailable"
            r = c.get("/readyz")
            assert r.status_code == 503 and not r.json()["ready"] and r.json()["jobs_store"].startswith("unavailable")
        finally:
            ops_redis.start()
        deadline = time.time() + 30
        while (r := c.get("/readyz")).status_code != 200 and time.time() < deadline:
            time.sleep(0.2)
        assert r.json()["jobs_store"] == "ok"
        # Back: a job submitted now runs (after the generation budget refilled: 6/min).
        deadline = time.time() + 30
        while (r := c.post("/v1/jobs", json={"prompt": "after", "steps": 2})).status_code == 429 and \
                time.time() < deadline:
            time.sleep(1)
        assert r.status_code == 202, r.text


def _errors_total(metrics_text: str, kind: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("ray_sdserve_errors_total{") and f'kind="{kind}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_errors_total_counts_503s_and_cancellations(ops_url, ops_redis, ray_cluster):
    """Ray's Prometheus export on this node: sdserve_errors_total counts a jobs-store 503 and a cancelled job."""
    import ray

    with ops(ops_url, OPS_KEYS[0]) as c:
        ops_redis.stop()
        try:
            assert c.get("/v1/jobs/job-0123").status_code == 503
        finally:
            ops_redis.start()
        deadline = time.time() + 30
        while (r := c.post("/v1/jobs", json={"prompt": "to cancel", "steps": 150, "width": 256,
                                             "height": 256})).status_code == 429 and time.time() < deadline:
            time.sleep(1)
        assert r.status_code == 202, r.text
        assert c.delete(f"/v1/jobs/{r.json()['id']}").json()["status"] in ("cancelled", "cancelling")
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline = time.time() + 90
    while time.time() < deadline:
        text = httpx.get(url, timeout=10).text
        if _errors_total(text, "jobs_store_unavailable") >= 1 and _errors_total(text, "cancelled") >= 1:
            break
        time.sleep(0.5)  # Ray exports every few seconds: a scrape is cheap, the export is the wait
    assert _errors_total(text, "jobs_store_unavailable") >= 1, [ln for ln in text.splitlines() if "sdserve_err" in ln]
    assert _errors_total(text, "cancelled") >= 1
