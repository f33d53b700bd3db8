"""Input images checked in the ingress, before a request is queued (issue 19): every image of a request is fetched
(URIs only under the serving config's allowlist), size-checked and decoded off the event loop, so a bad image is a
4xx naming its field at once, never a failed model call or a failed job later.

No FastAPI, no Ray: the routes map the GenerationError this raises onto their own error flavour.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from core.schemas import GenerationRequest

if TYPE_CHECKING:
    from core.image_inputs import RequestImages
    from serving.config import ImageInputsConfig


def has_images(req: GenerationRequest) -> bool:
    return req.init_image is not None or req.mask_image is not None or bool(req.control)


async def check_request_images(req: GenerationRequest, cfg: "ImageInputsConfig") -> "RequestImages | None":
    """The decoded images (None when the request carries none). Raises GenerationError(validation, field)."""
    if not has_images(req):
        return None
    from core.image_inputs import decode_request_images

    # Decoding is CPU work (PIL releases the GIL for most of it): a thread keeps the ingress's event loop free.
    return await asyncio.to_thread(decode_request_images, req.init_image, req.mask_image,
                                   [c.image for c in req.control], cfg.limits, cfg.uri_policy())
