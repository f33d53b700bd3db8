"""AUTOMATIC1111-compatible routes under /sdapi/v1 (translation and shapes in serving/a1111.py), so unmodified
A1111 clients and bots work: txt2img, img2img (both with ControlNet units), progress, interrupt, sd-models,
samplers, schedulers, options, loras (the current checkpoint's LoRA library, for `<lora:name:weight>` in prompts),
and the lists sdserve has nothing in yet (scripts, sd-vae, prompt-styles, embeddings).

Errors answer FastAPI's {"detail": ...} (422 [{loc, msg, type}] naming the A1111 field), as A1111's own API does.
State (the in-flight generations GET progress reports and POST interrupt cancels, and the model POST options
picks) belongs to this ingress replica: with several ingress replicas, each keeps its own.
"""
# No `from __future__ import annotations`: FastAPI must see real annotation objects.
import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from core.schemas import ErrorKind, GenerationError
from serving.a1111 import A1111Error, A1111Request, ModelInfo, Txt2ImgPlan, Txt2ImgRequest, a1111_field, find_model, \
    options_response, samplers_response, schedulers_response, sd_models_response, to_generation_request, \
    txt2img_response
from serving.a1111_img2img import Img2ImgRequest, check_fields, prepare_images, to_img2img_request
from serving.image_checks import check_request_images
from serving.a1111_progress import ProgressBoard
from serving.http.auth import authorize_bearer_or_basic
from serving.http.errors import ApiError, field_loc, generation_error

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 compatible"])
# The API key as Bearer, or as the password of HTTP Basic (what A1111 clients send for --api-auth).
AUTH = Depends(authorize_bearer_or_basic)


@dataclass
class A1111Replica:
    """This ingress replica's A1111 state."""

    checkpoint: str  # the model /sdapi requests use without override_settings.sd_model_checkpoint
    board: ProgressBoard = field(default_factory=ProgressBoard)


def _state(request: Request) -> A1111Replica:
    state = getattr(request.app.state, "a1111", None)
    if state is None:  # first /sdapi call of this replica (one event loop: no race)
        state = request.app.state.a1111 = A1111Replica(request.app.state.ingress.config.default_model)
    return state


def _models(request: Request) -> list[ModelInfo]:
    return [ModelInfo(m.name, m.engine.source, m.engine.scheduler, m.engine.limits.max_images_per_request)
            for m in request.app.state.ingress.config.models]


def _unprocessable(field_name: str | None, message: str, status: int = 422) -> ApiError:
    return ApiError(status, [{"loc": field_loc(field_name), "msg": message, "type": "value_error"}])


def _outcome_error(err: GenerationError) -> Exception:
    if err.kind in (ErrorKind.VALIDATION, ErrorKind.CAPACITY):
        field_name = "prompt" if (err.field or "").startswith("loras") else err.field  # A1111: <lora:> tags
        return _unprocessable(a1111_field(field_name), err.message)
    return generation_error(err, openai=False)


@router.post("/txt2img", summary="A1111 txt2img: images (base64 PNG), parameters, info (JSON string)")
async def txt2img(body: Txt2ImgRequest, request: Request, caller: str = AUTH):
    state = _state(request)
    try:
        plan = to_generation_request(body, _models(request), state.checkpoint)
    except A1111Error as err:
        raise _unprocessable(err.field, err.message, err.status) from None
    return await _generate(request, body, plan, "txt2img")


@router.post("/img2img", summary="A1111 img2img (init_images, mask, denoising_strength, inpainting): images "
             "(base64 PNG), parameters, info (JSON string)")
async def img2img(body: Img2ImgRequest, request: Request, caller: str = AUTH):
    state = _state(request)
    image_cfg = request.app.state.ingress.config.image_inputs
    try:
        blur = check_fields(body)
        prepared = await asyncio.to_thread(prepare_images, body, image_cfg.limits, image_cfg.uri_policy())
        plan = to_img2img_request(body, prepared, blur, _models(request), state.checkpoint)
    except A1111Error as err:
        raise _unprocessable(err.field, err.message, err.status) from None
    except GenerationError as err:  # a bad init image or mask, named as A1111 names it
        raise _unprocessable(err.field, err.message) from None
    return await _generate(request, body, plan, "img2img")


async def _generate(request: Request, body: A1111Request, plan: Txt2ImgPlan, kind: str) -> dict[str, Any]:
    """Check the request's images (ControlNet units too) before it is queued, run it with progress, answer."""
    ingress = request.app.state.ingress
    state = _state(request)
    name = ingress.check_request(plan.request, openai=False)
    try:
        plan = dataclasses.replace(plan, request=await check_request_images(plan.request,
                                                                            ingress.config.image_inputs))
    except GenerationError as err:
        raise _outcome_error(err) from None
    key, gen = state.board.begin(kind)

    def on_progress(step: int, total: int) -> None:
        gen.step, gen.steps = step, total

    def on_preview(step: int, total: int, images: list[str]) -> None:
        if images:  # A1111 shows one current image: the first of the batch
            gen.current_image = images[0]

    task = asyncio.ensure_future(ingress.stream_model(name, plan.request, on_progress, on_preview))
    gen.cancel = task.cancel  # the task's cancellation cancels the stream, which stops the request in the engine
    try:
        outcome = await task
    except asyncio.CancelledError:
        if not gen.interrupted:
            raise  # this HTTP request itself was cancelled (client gone)
        raise ApiError(409, f"interrupted at step {gen.step}/{gen.steps} (POST /sdapi/v1/interrupt)") from None
    finally:
        state.board.end(key)
    if isinstance(outcome, GenerationError):
        raise _outcome_error(outcome)
    return txt2img_response(body, plan, outcome, gen.timestamp)


@router.get("/progress", summary="A1111 progress of the running generation(s) of this replica")
async def progress(request: Request, skip_current_image: bool = False, caller: str = AUTH):
    return _state(request).board.progress(skip_current_image)


@router.post("/interrupt", summary="Cancel the running A1111 generation(s) of this replica")
async def interrupt(request: Request, caller: str = AUTH):
    _state(request).board.interrupt()
    return {}


@router.get("/sd-models", summary="Served models as A1111 checkpoints")
async def sd_models(request: Request, caller: str = AUTH):
    return sd_models_response(_models(request))


@router.get("/samplers", summary="A1111 sampler names sdserve maps onto its schedulers")
async def samplers(caller: str = AUTH):
    return samplers_response()


@router.get("/schedulers", summary="A1111 schedulers (sigma schedules) sdserve honours")
async def schedulers(caller: str = AUTH):
    return schedulers_response()


@router.get("/options", summary="A1111 options (sd_model_checkpoint: this replica's default for /sdapi)")
async def get_options(request: Request, caller: str = AUTH):
    return options_response(_state(request).checkpoint)


@router.post("/options", summary="Set A1111 options; only sd_model_checkpoint is supported")
async def set_options(request: Request, body: dict[str, Any] = Body(...), caller: str = AUTH):
    state = _state(request)
    unsupported = sorted(k for k in body if k != "sd_model_checkpoint")
    if unsupported:
        raise _unprocessable(unsupported[0], f"option {unsupported[0]!r} is not supported; sdserve accepts only "
                                             "sd_model_checkpoint")
    if "sd_model_checkpoint" in body:
        value = body["sd_model_checkpoint"]
        if not isinstance(value, str):
            raise _unprocessable("sd_model_checkpoint", "sd_model_checkpoint must be a string")
        try:
            state.checkpoint = find_model(value, _models(request), "sd_model_checkpoint").name
        except A1111Error as err:
            raise _unprocessable(err.field, err.message) from None
    return None


@router.get("/loras", summary="LoRAs of the current checkpoint, in A1111's shape (name, alias, path, metadata)")
async def loras(request: Request, caller: str = AUTH):
    name = _state(request).checkpoint
    entries = await request.app.state.ingress.models[name].loras.remote()
    return [{"name": e["name"], "alias": e["name"], "path": f"{e['name']}.safetensors",
             "metadata": {"ss_base_model_version": e["family"], "ss_network_dim": e["rank"],
                          "trigger_words": e["trigger_words"], "layout": e["layout"], "size_bytes": e["size_bytes"]}}
            for e in entries]


# What A1111 clients list at start-up (webuiapi asks for scripts when constructed): sdserve has none of these,
# and says so in A1111's shapes rather than with a 404.
@router.get("/scripts", summary="Scripts (none)")
async def scripts(caller: str = AUTH):
    return {"txt2img": [], "img2img": []}


@router.get("/sd-vae", summary="Separate VAEs (none: each model uses its own)")
async def sd_vae(caller: str = AUTH):
    return []


@router.get("/prompt-styles", summary="Saved prompt styles (none)")
async def prompt_styles(caller: str = AUTH):
    return []


@router.get("/embeddings", summary="Textual-inversion embeddings (none)")
async def embeddings(caller: str = AUTH):
    return {"loaded": {}, "skipped": {}}
