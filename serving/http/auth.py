"""The auth dependency of every model route: failed-auth throttle (429), API key (401), then the per-caller rate
limit (429) from the generation budget (POST) or the read budget (GET: job polling, results, models).

The keys, the throttle and the limiters belong to the running ingress (`request.app.state.ingress`); see
serving/security.py for how keys are checked and buckets refilled.
"""
# No `from __future__ import annotations`: FastAPI resolves dependency signatures at route registration.
import base64
import binascii

from fastapi import Depends, Request

from serving.http.errors import ApiError
from serving.security import AuthFailure, retry_after_header

READ_METHODS = ("GET", "HEAD")


async def authorize(request: Request) -> str:
    """Returns the caller id (the key's id, or the client address when auth is off)."""
    return _authorize(request, request.headers.get("authorization"))


async def authorize_bearer_or_basic(request: Request) -> str:
    """authorize, also accepting HTTP Basic with the API key as the password (any user name): what A1111 clients
    send for A1111's --api-auth user:password (e.g. webuiapi's set_auth), so they need no change."""
    header = request.headers.get("authorization")
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() == "basic" and token.strip():
        try:
            _, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep, password = "", ""
        header = f"Bearer {password}" if sep and password else "Basic (malformed)"
    return _authorize(request, header)


# Route parameters: `caller: str = AUTH_DEPENDENCY`.
AUTH_DEPENDENCY = Depends(authorize)
BEARER_OR_BASIC = Depends(authorize_bearer_or_basic)


def _authorize(request: Request, header: str | None) -> str:
    ingress = request.app.state.ingress
    address = request.client.host if request.client else "unknown"
    if ingress.keys.enabled:
        wait = ingress.auth_throttle.blocked_for(address)
        if wait > 0:  # checked before the key: a guesser learns nothing while throttled
            raise ApiError(429, {"message": f"too many failed authentications from this address; retry in "
                                 f"{wait:.0f}s", "code": "auth_throttled"}, {"Retry-After": retry_after_header(wait)})
    try:
        caller = ingress.keys.authenticate(header)
    except AuthFailure as err:
        ingress.auth_throttle.failed(address)
        raise ApiError(401, {"message": err.message, "code": "invalid_api_key"},
                       {"WWW-Authenticate": "Bearer"}) from None
    caller = caller or f"addr-{address}"
    request.state.caller = caller
    limiter = ingress.read_limiter if request.method in READ_METHODS else ingress.limiter
    if limiter is not None:
        wait = limiter.acquire(caller)
        if wait > 0:
            raise ApiError(429, {"message": f"rate limit exceeded; retry in {wait:.1f}s", "code": "rate_limited"},
                           {"Retry-After": retry_after_header(wait)})
    return caller
