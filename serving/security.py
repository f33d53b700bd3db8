"""API keys, per-key rate limits, the body size limit and the prompt blocklist of the HTTP ingress.

Keys are compared in constant time and never logged: logs and job ownership use `key_id` (a short hash).
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import math
import threading
import time
from dataclasses import dataclass


def key_id(key: str) -> str:
    """Stable, non-reversible name for a key (logs, rate-limit buckets, job ownership)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class AuthFailure(Exception):
    message: str


class ApiKeys:
    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def authenticate(self, authorization: str | None) -> str | None:
        """The caller's key id (None when auth is off). Raises AuthFailure with a reason that names no key."""
        if not self.enabled:
            return None
        if not authorization:
            raise AuthFailure("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthFailure("malformed Authorization header: expected 'Bearer <key>'")
        digest = hashlib.sha256(token.encode()).digest()
        # Check every key (no early exit) so timing does not tell how many keys or which matched.
        ok = False
        for known in self._digests:
            ok |= hmac.compare_digest(digest, known)
        if not ok:
            raise AuthFailure("invalid API key")
        return key_id(token)


class RateLimiter:
    """Token bucket per caller: `burst` requests back to back, refilled at requests_per_minute."""

    def __init__(self, requests_per_minute: float, burst: int, max_callers: int = 100_000):
        self.rate = requests_per_minute / 60.0
        self.burst = float(burst)
        self.max_callers = max_callers
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last refill time)
        self._lock = threading.Lock()

    def acquire(self, caller: str, now: float | None = None) -> float:
        """0 when allowed (a token is taken), else seconds until the next token (for Retry-After)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[caller] = (tokens - 1, now)
                self._evict_if_large()
                return 0.0
            self._buckets[caller] = (tokens, now)
            return (1 - tokens) / self.rate

    def _evict_if_large(self) -> None:
        if len(self._buckets) > self.max_callers:  # bounded memory: drop the idlest half
            for caller, _ in sorted(self._buckets.items(), key=lambda kv: kv[1][1])[: self.max_callers // 2]:
                del self._buckets[caller]


class FailureThrottle:
    """Failed authentications per client address: after `max_failures` within `window_s` the address gets 429
    (before its key is even checked) until the oldest failure leaves the window. Keys cannot be guessed at speed,
    and a client with a bad key configured stops hammering the server."""

    def __init__(self, max_failures: int, window_s: float, max_clients: int = 100_000):
        self.max_failures, self.window_s, self.max_clients = max_failures, window_s, max_clients
        self._failures: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> collections.deque:
        window = self._failures.get(client)
        if window is None:
            return collections.deque()
        while window and window[0] <= now - self.window_s:
            window.popleft()
        if not window:
            del self._failures[client]
        return window

    def blocked_for(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` may try again (0: not throttled)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            window = self._recent(client, now)
            if len(window) < self.max_failures:
                return 0.0
            return window[0] + self.window_s - now

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._recent(client, now)
            self._failures.setdefault(client, collections.deque(maxlen=self.max_failures)).append(now)
            if len(self._failures) > self.max_clients:  # bounded memory: forget the longest-quiet half
                quiet = sorted(self._failures, key=lambda c: self._failures[c][-1])[: self.max_clients // 2]
                for c in quiet:
                    del self._failures[c]


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class Blocklist:
    def __init__(self, terms: list[str]):
        self.terms = [t.lower() for t in terms if t.strip()]

    def match(self, *texts: str | None) -> str | None:
        for text in texts:
            low = (text or "").lower()
            for term in self.terms:
                if term in low:
                    return term
        return None


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 when Content-Length or the streamed body exceeds the route's limit.

    `limit_of(scope)` -> (limit in bytes, the config key that sets it): routes that take images have a larger one
    (serving/http/uploads.py).

    A chunked body has no Content-Length: it is counted as it streams, and the 413 is sent the moment it passes
    the limit. The app then sees the body read fail (FastAPI turns that into its own 400 "error parsing the
    body"); that second response is dropped, the client already has the 413.
    """

    def __init__(self, app, limit_of):
        self.app, self.limit_of = app, limit_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, key = self.limit_of(scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return await _send_413(send, limit, key, scope)
        seen = 0
        started = rejected = False

        async def limited_receive():
            nonlocal seen, rejected
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    if not started and not rejected:
                        rejected = True
                        await _send_413(send, limit, key, scope)
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if rejected:
                return  # the app's answer to the aborted body read: the 413 went out instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started and not rejected:
                await _send_413(send, limit, key, scope)


async def _send_413(send, limit: int, key: str, scope) -> None:
    import json

    message = f"request body exceeds {limit} bytes ({key})"
    if any(p in scope.get("path", "") for p in ("/v1/images/", "/v1/models")):  # OpenAI error shape there
        payload = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                             "code": "request_too_large"}}
    else:
        payload = {"detail": {"message": message, "field": None, "code": "request_too_large"}}
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
