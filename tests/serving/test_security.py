"""serving.security on its own (no Ray): API keys, the per-caller token-bucket rate limiter, Retry-After, the
prompt blocklist and the body-size middleware."""
from __future__ import annotations

import asyncio
import json
import threading

import pytest

from serving.security import ApiKeys, AuthFailure, Blocklist, BodyLimitMiddleware, RateLimiter, key_id, \
    retry_after_header


# ---------------------------------------------------------------- API keys
def test_api_keys():
    keys = ApiKeys(["k1", "k2"])
    assert keys.authenticate("Bearer k2") == key_id("k2")
    assert keys.authenticate("bearer   k1 ") == key_id("k1")  # scheme case-insensitive, token trimmed
    for header, reason in [(None, "missing"), ("Basic k1", "malformed"), ("Bearer ", "malformed"),
                           ("Bearer nope", "invalid")]:
        with pytest.raises(AuthFailure) as err:
            keys.authenticate(header)
        assert reason in err.value.message and "k1" not in err.value.message
    assert ApiKeys([]).authenticate(None) is None and not ApiKeys([]).enabled


def test_key_id_is_stable_and_names_no_key():
    assert key_id("secret") == key_id("secret") != key_id("secret2")
    assert "secret" not in key_id("secret") and key_id("secret").startswith("key-")


# ---------------------------------------------------------------- rate limiter
def test_rate_limiter_token_bucket():
    rl = RateLimiter(requests_per_minute=60, burst=2)
    assert rl.acquire("a", now=0) == 0 and rl.acquire("a", now=0) == 0
    assert rl.acquire("a", now=0) == pytest.approx(1.0)  # empty: one token a second
    assert rl.acquire("b", now=0) == 0  # buckets are per caller
    assert rl.acquire("a", now=1.01) == 0  # refilled


def test_rate_limiter_refills_fractionally_and_denials_take_nothing():
    rl = RateLimiter(requests_per_minute=30, burst=1)  # one token every 2 s
    assert rl.acquire("a", now=0) == 0
    assert rl.acquire("a", now=0.5) == pytest.approx(1.5)  # a quarter refilled: 1.5 s to go
    assert rl.acquire("a", now=1.0) == pytest.approx(1.0)  # the denial at 0.5 took nothing
    assert rl.acquire("a", now=2.0) == 0


def test_rate_limiter_idle_caller_gets_at_most_a_burst():
    rl = RateLimiter(requests_per_minute=60, burst=3)
    assert rl.acquire("a", now=0) == 0
    granted = [rl.acquire("a", now=3600) for _ in range(5)]  # an hour idle: the bucket holds 3, not 3600
    assert granted[:3] == [0, 0, 0] and granted[3] > 0 and granted[4] > 0


def test_rate_limiter_grants_exactly_the_burst_under_concurrency():
    rl = RateLimiter(requests_per_minute=0.001, burst=50)  # no refill during the test
    grants, start = [], threading.Barrier(8)

    def worker():
        start.wait()
        grants.extend(rl.acquire("shared", now=0) == 0 for _ in range(20))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(grants) == 50 and len(grants) == 160  # 160 tries, exactly the 50 tokens granted


def test_rate_limiter_memory_is_bounded_dropping_the_idlest():
    rl = RateLimiter(requests_per_minute=60, burst=1, max_callers=10)
    for i in range(11):
        rl.acquire(f"c{i}", now=float(i))
    assert len(rl._buckets) <= 10 and "c10" in rl._buckets and "c0" not in rl._buckets
    assert rl.acquire("c0", now=11.0) == 0  # an evicted caller starts with a full bucket again


def test_retry_after_is_whole_seconds_and_at_least_one():
    assert retry_after_header(0.01) == "1" and retry_after_header(1.0) == "1" and retry_after_header(1.2) == "2"


# ---------------------------------------------------------------- blocklist
def test_blocklist_is_case_insensitive():
    assert Blocklist(["Bad Word"]).match("a BAD WORD here") == "bad word"
    assert Blocklist(["x"]).match("fine", None) is None
    assert Blocklist(["  ", ""]).match("anything") is None  # blank terms block nothing
    assert Blocklist(["neg"]).match("ok", "a NEGative prompt") == "neg"  # every text is checked


# ---------------------------------------------------------------- body limit
def _call(middleware, path: str, chunks: list[bytes], content_length: int | None = None):
    """Run the ASGI middleware on one request; returns (status, body of the response) and what the app read."""
    headers = [(b"content-length", str(content_length).encode())] if content_length is not None else []
    scope = {"type": "http", "path": path, "headers": headers}
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


async def _echo_app(scope, receive, send):
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def test_body_limit_passes_small_bodies_and_refuses_large_ones_in_each_shape():
    mw = BodyLimitMiddleware(_echo_app, limit_of=lambda scope: (10, "security.max_body_bytes"))
    assert _call(mw, "/v1/generate", [b"12345", b"67890"]) == (200, b"10")
    status, body = _call(mw, "/v1/generate", [b"x" * 11], content_length=11)  # refused by the header
    assert status == 413 and json.loads(body)["detail"]["code"] == "request_too_large"
    status, body = _call(mw, "/v1/images/generations", [b"123456", b"789012"])  # no header: counted as it streams
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


def test_auth_failure_throttle_sliding_window():
    from serving.security import FailureThrottle

    th = FailureThrottle(max_failures=3, window_s=10)
    for t in (0, 1, 2):
        assert th.blocked_for("1.2.3.4", now=t) == 0
        th.failed("1.2.3.4", now=t)
    assert th.blocked_for("1.2.3.4", now=3) == pytest.approx(7)  # until the first failure leaves the window
    assert th.blocked_for("5.6.7.8", now=3) == 0  # per address
    assert th.blocked_for("1.2.3.4", now=10.01) == 0  # one failure left the window: one more try
