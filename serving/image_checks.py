"""Input images checked in the ingress, before a request is queued (issue 19): every image of a request is fetched
(URIs only under the serving config's allowlist), size-checked and decoded off the event loop, so a bad image is a
4xx naming its field at once, never a failed model call or a failed job later.

An allowed URI is read here, once, and the request goes on with its bytes: the model replicas read no URIs (their
engines refuse them by default), and a job stores the image it was accepted with.

No FastAPI, no Ray: the routes map the GenerationError this raises onto their own error flavour.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from core.schemas import GenerationRequest

if TYPE_CHECKING:
    from serving.config import ImageInputsConfig


def has_images(req: GenerationRequest) -> bool:
    return req.init_image is not None or req.mask_image is not None or bool(req.control)


def _load_and_check(req: GenerationRequest, cfg: "ImageInputsConfig") -> GenerationRequest:
    from core.image_inputs import classify_source, decode_request_images, load_bytes

    limits, uris = cfg.limits, cfg.uri_policy()

    def loaded(source, field):
        if isinstance(source, str) and classify_source(source) == "uri":
            return load_bytes(source, field, limits, uris)
        return source

    update: dict[str, Any] = {k: loaded(getattr(req, k), k) for k in ("init_image", "mask_image")
                              if getattr(req, k) is not None}
    if req.control:
        update["control"] = [c.model_copy(update={"image": loaded(c.image, f"control.{i}.image")})
                             for i, c in enumerate(req.control)]
    req = req.model_copy(update=update)
    decode_request_images(req.init_image, req.mask_image, [c.image for c in req.control], limits, uris)
    return req


async def check_request_images(req: GenerationRequest, cfg: "ImageInputsConfig") -> GenerationRequest:
    """The request with its URIs read (allowlist permitting) and every image checked. Raises
    GenerationError(validation, field)."""
    if not has_images(req):
        return req
    # Decoding is CPU work (PIL releases the GIL for most of it): a thread keeps the ingress's event loop free.
    return await asyncio.to_thread(_load_and_check, req, cfg)
