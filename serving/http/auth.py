"""The auth dependency of every model route: API key (401), then the per-caller rate limit (429).

The keys and the limiter belong to the running ingress (`request.app.state.ingress`); see serving/security.py
for how keys are checked and buckets refilled.
"""
# No `from __future__ import annotations`: FastAPI resolves dependency signatures at route registration.
from fastapi import Request

from serving.http.errors import ApiError
from serving.security import AuthFailure, retry_after_header


async def authorize(request: Request) -> str:
    """Returns the caller id (the key's id, or the client address when auth is off)."""
    ingress = request.app.state.ingress
    try:
        caller = ingress.keys.authenticate(request.headers.get("authorization"))
    except AuthFailure as err:
        raise ApiError(401, {"message": err.message, "code": "invalid_api_key"},
                       {"WWW-Authenticate": "Bearer"}) from None
    caller = caller or f"addr-{request.client.host if request.client else 'unknown'}"
    request.state.caller = caller
    if ingress.limiter is not None:
        wait = ingress.limiter.acquire(caller)
        if wait > 0:
            raise ApiError(429, {"message": f"rate limit exceeded; retry in {wait:.1f}s", "code": "rate_limited"},
                           {"Retry-After": retry_after_header(wait)})
    return caller
