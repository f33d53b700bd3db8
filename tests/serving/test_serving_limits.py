"""The "strict" app: per-key rate limits, backpressure from a bounded queue, body size limit, prompt blocklist."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serving.conftest import STRICT_KEYS

pytestmark = pytest.mark.integration


def strict(serve_url, key):
    return httpx.Client(base_url=f"{serve_url}/strict", timeout=120, headers={"Authorization": f"Bearer {key}"})


def test_rate_limit_is_per_key_with_retry_after(serve_url):
    # POSTs draw from the generation budget (30/min, burst 10); the key is checked and a token taken before the
    # body is validated, so an empty prompt (400) costs a token without running the model.
    with strict(serve_url, STRICT_KEYS[0]) as c:
        codes = [c.post("/v1/images/generations", json={"prompt": ""}) for _ in range(14)]
        limited = [r for r in codes if r.status_code == 429]
        assert limited and codes[0].status_code == 400
        assert int(limited[0].headers["retry-after"]) >= 1
        assert limited[0].json()["error"]["type"] == "rate_limit_exceeded"  # OpenAI route, OpenAI shape
        assert c.get("/v1/models").status_code == 200  # reads have a budget of their own
    with strict(serve_url, STRICT_KEYS[2]) as other:
        assert other.post("/v1/images/generations", json={"prompt": ""}).status_code == 400  # own bucket


def test_full_queue_answers_503_with_retry_after(serve_url):
    # One request runs, one waits (max_ongoing_requests=1, max_queued_requests=1): the rest are rejected.
    body = {"prompt": "slow", "steps": 300, "seed": 1}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: strict(serve_url, STRICT_KEYS[1]).post("/v1/generate", json=body),
                                  range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "3"
    assert "overloaded" in rejected.json()["detail"]["message"]


def test_body_size_limit_413(serve_url):
    with strict(serve_url, STRICT_KEYS[2]) as c:
        r = c.post("/v1/generate", json={"prompt": "x" * 5000})
        assert r.status_code == 413 and "4096 bytes (image_inputs.max_body_bytes)" in r.json()["detail"]["message"]
        r = c.post("/v1/images/generations", json={"prompt": "x" * 3000})  # no images here: the small limit
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "2048 bytes (security.max_body_bytes)" in r.json()["error"]["message"]


def chunks(total: int, size: int = 512):
    """A body sent with Transfer-Encoding: chunked (no Content-Length), as a streaming client does."""
    yield b'{"prompt": "'
    for _ in range(total // size):
        yield b"x" * size
    yield b'"}'


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/images/generations", "/v1/jobs"])
def test_oversized_chunked_body_is_413(serve_url, path):
    with strict(serve_url, STRICT_KEYS[2]) as c:
        r = c.post(path, content=chunks(8192), headers={"Content-Type": "application/json"})
        assert "content-length" not in {k.lower() for k in r.request.headers}  # really chunked
        assert r.status_code == 413, (r.status_code, r.text)
        err = r.json()["error"] if "/images/" in path else r.json()["detail"]
        limit = "2048 bytes" if "/images/" in path else "4096 bytes"  # routes that take images: a larger limit
        assert err["code"] == "request_too_large" and limit in err["message"]
        small = c.post("/v1/generate", content=chunks(512), headers={"Content-Type": "application/json"})
        assert small.status_code != 413  # under the limit, chunked bodies are read as usual


def test_prompt_blocklist_400(serve_url):
    with strict(serve_url, STRICT_KEYS[2]) as c:
        r = c.post("/v1/generate", json={"prompt": "a Forbidden Thing here"})
        assert r.status_code == 400 and r.json()["detail"]["field"] == "prompt"
        r = c.post("/v1/images/generations", json={"prompt": "forbidden thing"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert c.post("/v1/generate", json={"prompt": "fine", "steps": 1}).status_code == 200


def test_bench_serve_reports_levels_and_offline_ratio(serve_url):
    from serving.bench import run_bench
    from serving.config import ServingConfig
    from tests.serving.conftest import KEYS, main_config

    report = run_bench(ServingConfig.model_validate(main_config()), url=serve_url, concurrency=[1, 4],
                       requests_per_level=4, body={"steps": 2}, api_key=KEYS[0], offline=True)
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 4]
    assert all(lv["ok"] == 4 and lv["p50_s"] <= lv["p99_s"] for lv in report["levels"])
    assert report["offline"]["throughput_rps"] > 0 and report["serving_efficiency"] > 0
    assert "added_latency_ms" in report
