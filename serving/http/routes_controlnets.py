"""ControlNet listings: GET /v1/controlnets (native) and the A1111 ControlNet extension's GET /controlnet/model_list,
/controlnet/module_list and /controlnet/version, so its clients find the names `control[i].model` (and a unit's
`model`) take.

The list comes from each model deployment (ModelServer.controlnets: what its engine loaded), asked once per
ingress replica and model; while a model cannot answer, its serving config's list stands in.
"""
# No `from __future__ import annotations`: FastAPI must see real annotation objects.
import asyncio
import logging

from fastapi import APIRouter, Request

from serving.a1111_controlnet import MODULES
from serving.http.auth import AUTH_DEPENDENCY, BEARER_OR_BASIC

log = logging.getLogger("ray.serve")
router = APIRouter()
EXTENSION_VERSION = 2  # what the sd-webui-controlnet API reports; clients only check that it answers


def configured(model) -> list:
    """A model's ControlNets as its serving config lists them (EngineConfig.controlnets)."""
    return list(getattr(model.engine, "controlnets", None) or [])


async def served_controlnets(request: Request) -> list[dict]:
    """[{id, model, family, source}] over every served model."""
    ingress = request.app.state.ingress
    known = getattr(request.app.state, "controlnets", None)
    if known is None:
        known = request.app.state.controlnets = {}
    out = []
    for m in ingress.config.models:
        if m.name not in known and configured(m):
            try:
                known[m.name] = await asyncio.wait_for(ingress.models[m.name].controlnets.remote(), 5.0)
            except Exception as err:  # noqa: BLE001 - a busy or absent replica must not fail the listing
                log.info("model %s: controlnets not known yet (%s)", m.name, type(err).__name__)
        listed = known.get(m.name) or [{"name": c.name, "family": m.engine.family, "source": c.source}
                                       for c in configured(m)]
        out += [{"id": c["name"], "object": "controlnet", "model": m.name, "family": c.get("family"),
                 "source": c.get("source")} for c in listed]
    return out


@router.get("/v1/controlnets", summary="ControlNets per served model (the names control[i].model takes)")
async def list_controlnets(request: Request, caller: str = AUTH_DEPENDENCY):
    return {"object": "list", "data": await served_controlnets(request)}


@router.get("/controlnet/model_list", tags=["AUTOMATIC1111 compatible"],
            summary="A1111 ControlNet extension: model names (a unit's `model`)")
async def a1111_model_list(request: Request, caller: str = BEARER_OR_BASIC):
    names = list(dict.fromkeys(c["id"] for c in await served_controlnets(request)))
    return {"model_list": names}


@router.get("/controlnet/module_list", tags=["AUTOMATIC1111 compatible"],
            summary="A1111 ControlNet extension: preprocessors sdserve runs (a unit's `module`)")
async def a1111_module_list(caller: str = BEARER_OR_BASIC):
    return {"module_list": list(MODULES), "module_detail": {}}


@router.get("/controlnet/version", tags=["AUTOMATIC1111 compatible"],
            summary="A1111 ControlNet extension: API version")
async def a1111_version(caller: str = BEARER_OR_BASIC):
    return {"version": EXTENSION_VERSION}
