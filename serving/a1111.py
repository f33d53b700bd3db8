"""AUTOMATIC1111 web UI API compatibility (/sdapi/v1): request schema, sampler/scheduler names, translation to
GenerationRequest, and A1111's response shapes (txt2img `info` as a JSON string, progress, samplers, models).

Pure: no FastAPI, no Ray. serving/http/routes_a1111.py wires it to HTTP; progress/interrupt state is
serving/a1111_progress.py.

What an A1111 request may carry that sdserve cannot honour is never dropped silently: features that would change
the image (hires fix, face restoration, tiling, scripts, styles, variation seeds, a refiner) are refused with a 422
naming the field when set to anything but their off value; sampler tuning knobs (eta, s_churn, ...), saving options
and other inert settings are accepted, ignored, and listed in `info` under `sdserve_ignored`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import ConfigDict, Field

from core.config import Strict
from core.schedulers import SCHEDULERS
from core.schemas import MAX_SEED, GenerationRequest, GenerationResult
from serving.a1111_controlnet import a1111_control_field, control_units
from serving.a1111_errors import A1111Error  # noqa: F401 - re-exported: routes and tests import it from here

VERSION = "sdserve-a1111-compat"


# ------------------------------------------------------------------------------------------------ samplers

@dataclass(frozen=True)
class Sampler:
    """An A1111 sampler and the sdserve schedulers it maps to (per A1111 scheduler choice)."""

    name: str  # as A1111 spells it
    aliases: tuple[str, ...]
    plain: str  # SCHEDULERS key with the sampler's own (uniform) timestep spacing
    karras: str | None = None  # SCHEDULERS key with Karras sigmas, when diffusers has it
    auto_karras: bool = False  # A1111's "Automatic" scheduler means Karras for this sampler
    options: dict[str, Any] = field(default_factory=dict)  # A1111's sampler options (GET /samplers)

    def scheduler_for(self, a1111_scheduler: str) -> str | None:
        if a1111_scheduler == "automatic":
            return self.karras if self.auto_karras and self.karras else self.plain
        if a1111_scheduler == "karras":
            return self.karras
        return self.plain if a1111_scheduler == "uniform" else None


# Diffusers' documented A1111 equivalents (diffusers docs, "Schedulers"), limited to the SCHEDULERS sdserve has.
# Missing on purpose: LMS, DPM++ SDE (diffusers' DPMSolverSDEScheduler draws from one seed per call, not per
# image), DPM++ 2M SDE Heun, DPM++ 3M SDE, DPM fast/adaptive, Restart, DDIM CFG++.
SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), "dpmpp_2m", "dpmpp_2m_karras", True, {"scheduler": "karras"}),
    Sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "dpmpp_2m_sde", "dpmpp_2m_sde_karras", False,
            {"brownian_noise": True}),
    Sampler("DPM++ 2S a", ("k_dpmpp_2s_a",), "dpmpp_sde_1s", None, False, {"second_order": True}),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler_a", None, False, {"uses_ensd": True}),
    Sampler("Euler", ("k_euler",), "euler", "euler_karras"),
    Sampler("Heun", ("k_heun",), "heun", None, False, {"second_order": True}),
    Sampler("DPM2", ("k_dpm_2",), "kdpm2", None, False, {"second_order": True}),
    Sampler("DPM2 a", ("k_dpm_2_a",), "kdpm2_a", None, False, {"second_order": True, "uses_ensd": True}),
    Sampler("DDIM", ("ddim",), "ddim"),
    Sampler("PLMS", ("plms", "PNDM"), "pndm"),
    Sampler("UniPC", ("unipc",), "unipc"),
    Sampler("LCM", ("lcm",), "lcm"),
    # Not in A1111 itself (Forge / ComfyUI names); offered because diffusers has them.
    Sampler("DEIS", ("deis",), "deis"),
    Sampler("DDPM", ("ddpm",), "ddpm"),
    Sampler("TCD", ("tcd",), "tcd"),
)
assert all(s.plain in SCHEDULERS and (s.karras is None or s.karras in SCHEDULERS) for s in SAMPLERS)

# A1111 schedulers (modules/sd_schedulers.py) sdserve can honour: name, label, aliases, default_rho.
SCHEDULER_ITEMS: tuple[dict[str, Any], ...] = (
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0, "need_inner_model": False},
    {"name": "uniform", "label": "Uniform", "aliases": None, "default_rho": -1.0, "need_inner_model": True},
    {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
)
_SCHEDULER_BY_KEY = {k.lower(): s["name"] for s in SCHEDULER_ITEMS for k in (s["name"], s["label"])}
_SAMPLER_BY_KEY = {k.lower(): s for s in SAMPLERS for k in (s.name, *s.aliases)}


def samplers_response() -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers: A1111's SamplerItem list (name, aliases, options)."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)} for s in SAMPLERS]


def schedulers_response() -> list[dict[str, Any]]:
    """GET /sdapi/v1/schedulers: A1111's SchedulerItem list."""
    return [dict(s) for s in SCHEDULER_ITEMS]


def resolve_sampler(sampler_name: str | None, scheduler: str | None, default: str) -> tuple[str, str, str]:
    """(A1111 sampler name, A1111 scheduler label, sdserve scheduler key) for A1111's sampler_name + scheduler.

    Accepts A1111's names and aliases case-insensitively, and the pre-1.9 combined names ("DPM++ 2M Karras").
    None: the model's default scheduler, named as A1111 would (the sampler that maps to it).
    """
    if sampler_name is None or not sampler_name.strip():
        if scheduler is None or not scheduler.strip():
            return (*_a1111_names(default), default)
        sampler_name = _a1111_names(default)[0]  # a scheduler alone applies to the model's default sampler
    key = sampler_name.strip().lower()
    sched_key = (scheduler or "automatic").strip().lower()
    sampler = _SAMPLER_BY_KEY.get(key)
    if sampler is None and key.endswith(" karras") and _SAMPLER_BY_KEY.get(key[:-7]) is not None:
        sampler, sched_key = _SAMPLER_BY_KEY[key[:-7]], "karras"  # legacy "DPM++ 2M Karras"
    if sampler is None:
        raise A1111Error("sampler_name", f"unknown sampler {sampler_name!r}; available: "
                                         f"{', '.join(s.name for s in SAMPLERS)} (GET /sdapi/v1/samplers)")
    a1111_sched = _SCHEDULER_BY_KEY.get(sched_key)
    if a1111_sched is None:
        raise A1111Error("scheduler", f"unsupported scheduler {scheduler!r}; available: "
                                      f"{', '.join(s['label'] for s in SCHEDULER_ITEMS)}")
    ours = sampler.scheduler_for(a1111_sched)
    if ours is None:
        raise A1111Error("scheduler", f"sampler {sampler.name!r} has no {a1111_sched!r} variant here; use "
                                      "Automatic or Uniform")
    label = next(s["label"] for s in SCHEDULER_ITEMS if s["name"] == a1111_sched)
    return sampler.name, label, ours


def _a1111_names(scheduler_key: str) -> tuple[str, str]:
    """The A1111 (sampler, scheduler label) that selects an sdserve scheduler key."""
    for s in SAMPLERS:
        if s.plain == scheduler_key:
            return s.name, "Uniform" if s.auto_karras else "Automatic"
        if s.karras == scheduler_key:
            return s.name, "Karras"
    return scheduler_key, "Automatic"


# ------------------------------------------------------------------------------------------------ txt2img request

class A1111Request(Strict):
    """The fields A1111's txt2img and img2img requests share (modules/api/models.py), typed and bounded.

    Unknown keys are refused (422 naming them); known ones sdserve cannot honour: see the module docstring.
    width/height/steps/cfg_scale left out take the model's defaults (A1111 would take 512/512/50/7).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prompt: str = Field("", max_length=10_000, description="What to draw.")
    negative_prompt: str | None = Field(None, max_length=10_000, description="What to avoid.")
    styles: list[str] | None = Field(None, max_length=64, description="Saved prompt styles (not supported; must be "
                                     "empty).")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="Seed of the first image; -1 = random.")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="Variation seed (only with subseed_strength).")
    subseed_strength: float = Field(0.0, ge=0, le=1, description="Variation strength (not supported; must be 0).")
    seed_resize_from_h: int = Field(-1, ge=-1, le=8192, description="Not supported (must be -1 or 0).")
    seed_resize_from_w: int = Field(-1, ge=-1, le=8192, description="Not supported (must be -1 or 0).")
    sampler_name: str | None = Field(None, max_length=64, description="A1111 sampler name, e.g. 'Euler a', "
                                     "'DPM++ 2M' (GET /sdapi/v1/samplers); model default when absent.")
    sampler_index: str | None = Field(None, max_length=64, description="Deprecated alias of sampler_name.")
    scheduler: str | None = Field(None, max_length=64, description="A1111 scheduler: Automatic, Uniform, Karras.")
    batch_size: int = Field(1, ge=1, le=64, description="Images per batch.")
    n_iter: int = Field(1, ge=1, le=64, description="Batches; batch_size * n_iter images in all.")
    steps: int | None = Field(None, ge=1, le=1000, description="Sampling steps; model default when absent.")
    cfg_scale: float | None = Field(None, ge=0, le=50, description="CFG scale; model default when absent.")
    width: int | None = Field(None, ge=64, le=8192, multiple_of=8, description="Width (multiple of 8).")
    height: int | None = Field(None, ge=64, le=8192, multiple_of=8, description="Height (multiple of 8).")
    restore_faces: bool | None = Field(None, description="Face restoration (not supported; must be false).")
    tiling: bool | None = Field(None, description="Tileable images (not supported; must be false).")
    do_not_save_samples: bool = Field(False, description="Ignored: sdserve never saves on the server.")
    do_not_save_grid: bool = Field(False, description="Ignored: sdserve never makes grids.")
    eta: float | None = Field(None, ge=0, le=10, description="Ignored sampler knob.")
    s_min_uncond: float | None = Field(None, description="Ignored sampler knob.")
    s_churn: float | None = Field(None, description="Ignored sampler knob.")
    s_tmax: float | None = Field(None, description="Ignored sampler knob.")
    s_tmin: float | None = Field(None, description="Ignored sampler knob.")
    s_noise: float | None = Field(None, description="Ignored sampler knob.")
    override_settings: dict[str, Any] | None = Field(None, description="Only sd_model_checkpoint is honoured "
                                                     "(picks the model); other keys are ignored and reported.")
    override_settings_restore_afterwards: bool = Field(True, description="Ignored (overrides never persist).")
    refiner_checkpoint: str | None = Field(None, max_length=256, description="Not supported (must be empty).")
    refiner_switch_at: float | None = Field(None, description="Refiner only; ignored without it.")
    disable_extra_networks: bool = Field(False, description="Ignored (no extra networks yet).")
    comments: dict[str, Any] | None = Field(None, description="Ignored.")
    token_merging_ratio: float | None = Field(None, description="Ignored.")
    token_merging_ratio_hr: float | None = Field(None, description="Ignored.")
    script_name: str | None = Field(None, description="Scripts (not supported; must be empty).")
    script_args: list[Any] = Field(default_factory=list, description="Scripts only (must be empty).")
    send_images: bool = Field(True, description="Return the images (false: `images` is empty).")
    save_images: bool = Field(False, description="Ignored: sdserve never saves on the server.")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, description="Always-on scripts: only "
                                             "`controlnet` ({\"args\": [ControlNet units]}), mapped onto sdserve's "
                                             "`control`; any other script gets 422.")
    force_task_id: str | None = Field(None, max_length=256, description="Ignored (no task queue ids).")
    infotext: str | None = Field(None, description="Infotext to parse parameters from (not supported; must be "
                                 "empty).")


class Txt2ImgRequest(A1111Request):
    """StableDiffusionTxt2ImgProcessingAPI's fields: the shared ones plus hires fix (refused when turned on)."""

    denoising_strength: float | None = Field(None, ge=0, le=1, description="Hires fix only; ignored without it.")
    firstpass_image: str | None = Field(None, description="Hires fix only (not supported; must be empty).")
    enable_hr: bool = Field(False, description="Hires fix (not supported; must be false).")
    firstphase_width: int = Field(0, description="Hires fix only; ignored without it.")
    firstphase_height: int = Field(0, description="Hires fix only; ignored without it.")
    hr_scale: float = Field(2.0, description="Hires fix only; ignored without it.")
    hr_upscaler: str | None = Field(None, description="Hires fix only; ignored without it.")
    hr_second_pass_steps: int = Field(0, description="Hires fix only; ignored without it.")
    hr_resize_x: int = Field(0, description="Hires fix only; ignored without it.")
    hr_resize_y: int = Field(0, description="Hires fix only; ignored without it.")
    hr_checkpoint_name: str | None = Field(None, description="Hires fix only; ignored without it.")
    hr_additional_modules: list[str] | None = Field(None, description="Hires fix only; ignored without it.")
    hr_sampler_name: str | None = Field(None, description="Hires fix only; ignored without it.")
    hr_scheduler: str | None = Field(None, description="Hires fix only; ignored without it.")
    hr_prompt: str = Field("", description="Hires fix only; ignored without it.")
    hr_negative_prompt: str = Field("", description="Hires fix only; ignored without it.")
    hr_cfg: float | None = Field(None, description="Hires fix only; ignored without it.")
    hr_distilled_cfg: float | None = Field(None, description="Hires fix only; ignored without it.")


# Fields whose non-off value would change the image in A1111: refused (field -> test that it is off).
_REFUSED: dict[str, Callable[[Any], bool]] = {
    "enable_hr": lambda v: not v, "restore_faces": lambda v: not v, "tiling": lambda v: not v,
    "styles": lambda v: not v, "subseed_strength": lambda v: v == 0, "script_name": lambda v: not v,
    "script_args": lambda v: not v, "refiner_checkpoint": lambda v: not v,
    "firstpass_image": lambda v: not v, "infotext": lambda v: not v,
    "seed_resize_from_h": lambda v: v in (-1, 0), "seed_resize_from_w": lambda v: v in (-1, 0),
}
_REFUSED_WHY = {"enable_hr": "hires fix", "restore_faces": "face restoration", "tiling": "tiling",
                "styles": "prompt styles", "subseed_strength": "variation seeds", "script_name": "scripts",
                "script_args": "scripts", "refiner_checkpoint": "a refiner",
                "firstpass_image": "hires fix", "infotext": "infotext parsing",
                "seed_resize_from_h": "seed resizing", "seed_resize_from_w": "seed resizing"}
# Mapped fields (never reported as ignored).
_MAPPED = {"prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter",
           "steps", "cfg_scale", "width", "height", "send_images", "override_settings", "alwayson_scripts"}


@dataclass(frozen=True)
class ModelInfo:
    """What the translation needs to know about a served model."""

    name: str
    source: str
    default_scheduler: str
    max_images_per_request: int


@dataclass(frozen=True)
class Txt2ImgPlan:
    """A translated txt2img request: the GenerationRequest plus what the response echoes."""

    request: GenerationRequest
    sampler_name: str
    scheduler_label: str
    ignored: tuple[str, ...]


def find_model(name: str, models: list[ModelInfo], field: str) -> ModelInfo:
    """A model by A1111 checkpoint title or name ('x', 'x.safetensors', 'x.safetensors [hash]' all find 'x')."""
    key = name.strip()
    if key.endswith("]") and " [" in key:
        key = key[: key.rindex(" [")]
    for suffix in (".safetensors", ".ckpt"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    for m in models:
        if key == m.name:
            return m
    raise A1111Error(field, f"unknown model {name!r}; available: {', '.join(m.name for m in models)} "
                            "(GET /sdapi/v1/sd-models)")


def to_generation_request(body: A1111Request, models: list[ModelInfo], default_model: str,
                          image_fields: dict[str, Any] | None = None, mapped: frozenset[str] = frozenset(),
                          ignored_extra: tuple[str, ...] = ()) -> Txt2ImgPlan:
    """Translate; every refusal is an A1111Error naming the A1111 field.

    image_fields: img2img's init_image/strength/mask_image/mask_blur (serving/a1111_img2img.py), `mapped` the
    A1111 fields they came from, `ignored_extra` what that translation accepted without effect.
    """
    from pydantic import ValidationError

    for name, is_off in _REFUSED.items():
        if name in type(body).model_fields and not is_off(getattr(body, name)):
            raise A1111Error(name, f"{name}: {_REFUSED_WHY[name]} is not supported by sdserve")
    control, control_ignored = control_units(body.alwayson_scripts)
    overrides = dict(body.override_settings or {})
    checkpoint = overrides.pop("sd_model_checkpoint", None)
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise A1111Error("override_settings.sd_model_checkpoint", "override_settings.sd_model_checkpoint: must be "
                                                                   "a model name (a string)")
    model = find_model(checkpoint, models, "override_settings.sd_model_checkpoint") if checkpoint else \
        find_model(default_model, models, "sd_model_checkpoint")
    sampler, label, scheduler = resolve_sampler(body.sampler_name or body.sampler_index, body.scheduler,
                                                model.default_scheduler)
    total = body.batch_size * body.n_iter
    if total > model.max_images_per_request:
        field_name = "n_iter" if body.n_iter > 1 else "batch_size"
        raise A1111Error(field_name, f"batch_size * n_iter = {total} images; model {model.name!r} allows at most "
                                     f"{model.max_images_per_request} per request")
    if not body.prompt.strip():
        raise A1111Error("prompt", "prompt must not be empty")
    fields = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "width": body.width,
              "height": body.height, "steps": body.steps, "guidance_scale": body.cfg_scale, "scheduler": scheduler,
              "seed": None if body.seed == -1 else body.seed, "num_images": total, "output_format": "png",
              "model": model.name, "control": control or None, **(image_fields or {})}
    try:
        req = GenerationRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        e = err.errors()[0]
        ours = ".".join(str(p) for p in e["loc"]) if e.get("loc") else None
        name = a1111_field(ours)
        raise A1111Error(name, f"{name}: {e['msg']}") from None
    # Reported: what the request set to something other than its inert default (clients such as webuiapi send
    # every field with its default; those are not worth a mention).
    fields_of = type(body).model_fields
    ignored = sorted(n for n in body.model_fields_set - _MAPPED - mapped - set(_REFUSED)
                     if getattr(body, n) != fields_of[n].get_default(call_default_factory=True))
    ignored += [f"override_settings.{k}" for k in sorted(overrides)]
    return Txt2ImgPlan(req, sampler, label, tuple(ignored + list(ignored_extra) + control_ignored))


# Our field -> A1111's, for errors coming back from the engine.
A1111_FIELD = {"guidance_scale": "cfg_scale", "num_images": "batch_size", "scheduler": "sampler_name",
               "model": "override_settings.sd_model_checkpoint", "strength": "denoising_strength",
               "init_image": "init_images.0", "mask_image": "mask", "mask_blur": "mask_blur"}


def a1111_field(ours: str | None) -> str | None:
    """Our field name (dotted for nested ones: control.0.scale) as the A1111 request names it."""
    if ours is None:
        return None
    return a1111_control_field(ours) or A1111_FIELD.get(ours, ours)


# ------------------------------------------------------------------------------------------------ responses

def infotext(prompt: str, negative: str | None, result: GenerationResult, sampler: str, label: str, seed: int) -> str:
    """A1111's generation-parameters text of one image (what its PNG `parameters` chunk holds)."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(f"Steps: {result.steps}, Sampler: {sampler}, Schedule type: {label}, CFG scale: "
                 f"{result.guidance_scale:g}, Seed: {seed}, Size: {result.width}x{result.height}, Model: "
                 f"{result.model}, Version: {VERSION}")
    return "\n".join(lines)


def txt2img_response(body: A1111Request, plan: Txt2ImgPlan, result: GenerationResult,
                     job_timestamp: str) -> dict[str, Any]:
    """A1111's TextToImageResponse (ImageToImageResponse has the same shape): images (base64 PNG), parameters (the
    request, A1111 names), info (JSON str)."""
    import base64

    seeds = [img.seed for img in result.images]
    n = len(seeds)
    negative = plan.request.negative_prompt or ""
    info = {
        "prompt": body.prompt, "all_prompts": [body.prompt] * n,
        "negative_prompt": negative, "all_negative_prompts": [negative] * n,
        "seed": seeds[0], "all_seeds": seeds, "subseed": body.subseed, "all_subseeds": [body.subseed] * n,
        "subseed_strength": 0, "width": result.width, "height": result.height,
        "sampler_name": plan.sampler_name, "cfg_scale": result.guidance_scale, "steps": result.steps,
        "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": result.model, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": plan.request.strength if plan.request.init_image is not None else
        getattr(body, "denoising_strength", None),
        "extra_generation_params": {"Schedule type": plan.scheduler_label, **_control_params(plan.request)},
        "index_of_first_image": 0,
        "infotexts": [infotext(body.prompt, negative, result, plan.sampler_name, plan.scheduler_label, s)
                      for s in seeds],
        "styles": [], "job_timestamp": job_timestamp, "clip_skip": 1,
        "is_using_inpainting_conditioning": plan.request.mask_image is not None,
        "version": VERSION,
        # sdserve additions: the scheduler that ran, and what the request set that had no effect.
        "sdserve_scheduler": result.scheduler, "sdserve_ignored": list(plan.ignored),
    }
    parameters = body.model_dump()
    if not getattr(body, "include_init_images", True):  # as A1111: the init images are not echoed back
        parameters.update({"init_images": None, "mask": None})
    parameters.update({"seed": seeds[0], "width": result.width, "height": result.height, "steps": result.steps,
                       "cfg_scale": result.guidance_scale, "sampler_name": plan.sampler_name,
                       "scheduler": plan.scheduler_label})
    images = [base64.b64encode(img.data).decode() for img in result.images] if body.send_images else []
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def _control_params(req: GenerationRequest) -> dict[str, str]:
    """The ControlNet extension's infotext entries ("ControlNet 0": "Module: canny, Model: ..., Weight: ...")."""
    return {f"ControlNet {i}": f"Module: {c.preprocess}, Model: {c.model}, Weight: {c.scale:g}, Guidance Start: "
                               f"{c.start:g}, Guidance End: {c.end:g}" for i, c in enumerate(req.control)}


def sd_models_response(models: list[ModelInfo]) -> list[dict[str, Any]]:
    """GET /sdapi/v1/sd-models: A1111's SDModelItem list (title = name: what sd_model_checkpoint takes)."""
    return [{"title": m.name, "model_name": m.name, "hash": None, "sha256": None, "filename": m.source,
             "config": None} for m in models]


def options_response(checkpoint: str) -> dict[str, Any]:
    """GET /sdapi/v1/options: the options sdserve has (A1111 returns hundreds; clients read sd_model_checkpoint)."""
    return {"sd_model_checkpoint": checkpoint, "sd_checkpoint_hash": None, "samples_format": "png",
            "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "eta_noise_seed_delta": 0}
