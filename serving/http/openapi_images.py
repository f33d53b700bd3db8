"""The OpenAPI document's image inputs and A1111 routes, stated as this deployment accepts them (used by
serving/http/openapi.py's `describe`).

- Image fields (init_image, mask_image, control[].image, A1111's init_images/mask, the edits route's files) carry
  the format IMAGE_FORMAT: an encoded PNG/JPEG/WebP image (base64, a data: URL, or a URI under
  image_inputs.uri_allowlist) within image_inputs.limits. A schema fuzzer registers a strategy for it (the
  contract test does); `strength` and `mask_image` require `init_image` (dependentRequired).
- ControlNet model names are an enum of the configured ControlNets (no ControlNet configured: `control` is empty).
- A1111 refusals are stated: the fields sdserve refuses when turned on accept only their off values, samplers and
  schedulers are enums, sizes/steps/images/prompt lengths follow the models' limits; a 422 remains for what JSON
  Schema cannot say (documented per route).
"""
from __future__ import annotations

from typing import Any

IMAGE_FORMAT = "sdserve-image"
# Multipart image parts: a file, or a text part holding what a JSON field would (base64, data: URL, allowed URI).
# Stated with the text form, so that a fuzzer's parts are images too.
IMAGE_FILE_FORMAT = IMAGE_FORMAT
ALPHA_MASK_FORMAT = "sdserve-alpha-mask"  # the edits route's mask: a PNG with transparency (base64 or a file)
OFF_VALUES: dict[str, list[Any]] = {
    "enable_hr": [False], "restore_faces": [None, False], "tiling": [None, False], "subseed_strength": [0],
    "script_name": [None, ""], "refiner_checkpoint": [None, ""], "firstpass_image": [None, ""],
    "infotext": [None, ""], "seed_resize_from_h": [-1, 0], "seed_resize_from_w": [-1, 0],
    "latent_mask": [None, ""], "initial_noise_multiplier": [None, 1],
}
EMPTY_LISTS = ("styles", "script_args")


def controlnet_names(config) -> list[str]:
    """The ControlNets any served model has (EngineConfig.controlnets, when the engine has them)."""
    names: list[str] = []
    for m in config.models:
        for c in getattr(m.engine, "controlnets", None) or []:
            name = getattr(c, "name", c)
            if name not in names:
                names.append(name)
    return names


def img2img_steps(config) -> dict[str, Any]:
    """An img2img request runs int(steps x strength) >= 1 steps (the engine refuses fewer). Stated as a subset JSON
    Schema can say: steps >= n and strength >= 1/n (rounded up), n = min(4, every model's max and default steps)."""
    import math

    n = max(1, min(min(m.engine.limits.max_steps, m.engine.defaults.steps or 4, 4) for m in config.models))
    return {"properties": {"steps": {"anyOf": [{"type": "integer", "minimum": n}, {"type": "null"}]},
                           "strength": {"anyOf": [{"type": "number", "minimum": math.ceil(100 / n) / 100},
                                                  {"type": "null"}]}},
            "description": f"With init_image: int(steps x strength) >= 1 denoising step (stated as steps >= {n}, "
                           f"strength >= {math.ceil(100 / n) / 100})."}


def _image(description: str, nullable: bool, fmt: str = IMAGE_FORMAT) -> dict[str, Any]:
    one = {"type": "string", "format": fmt}
    return {"anyOf": [one, {"type": "null"}], "description": description} if nullable else \
        {**one, "description": description}


def _set(props: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    if name in props:
        keep = {k: props[name][k] for k in ("description", "default", "title") if k in props[name]}
        props[name] = {**keep, **schema}


def _comp(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return schema.get("components", {}).get("schemas", {}).get(name, {})


def describe_generation_images(schema: dict[str, Any], config) -> None:
    import copy

    from serving.http.uploads import MULTIPART_PART_SCHEMA

    req = _comp(schema, "GenerationRequest")
    props = req.get("properties", {})
    if "init_image" not in props:
        return
    for name in ("init_image", "mask_image"):
        props[name] = _image(props[name].get("description", ""), True)
    req["dependentRequired"] = {"strength": ["init_image"], "mask_image": ["init_image"]}
    req["dependentSchemas"] = {"init_image": img2img_steps(config)}
    # The multipart `request` part as stated: its images come as the init_image / mask_image files.
    part = copy.deepcopy(req)
    for name in ("init_image", "mask_image", "strength"):
        part["properties"].pop(name, None)
    part.pop("dependentRequired")
    part["title"] = MULTIPART_PART_SCHEMA
    part["description"] = ("The JSON part `request` of a multipart body: GenerationRequest's fields (strength too, "
                           "with an init_image file); images go in the file parts.")
    schema["components"]["schemas"][MULTIPART_PART_SCHEMA] = part
    for path in ("/v1/generate", "/v1/jobs"):
        form = schema.get("paths", {}).get(path, {}).get("post", {}).get("requestBody", {}).get("content", {}) \
            .get("multipart/form-data", {}).get("schema", {}).get("properties", {})
        for name in ("init_image", "mask_image"):
            if name in form:
                form[name] = {"type": "string", "format": IMAGE_FILE_FORMAT, "description": props[name]
                              ["description"]}
    names = controlnet_names(config)
    if not names:
        props["control"]["maxItems"] = 0
        props["control"]["description"] += " No ControlNet is configured here: must be empty."
    ctrl = _comp(schema, "ControlInput").get("properties", {})
    if ctrl:
        ctrl["image"] = _image(ctrl["image"].get("description", ""), False)
        if names:
            ctrl["model"] = {**ctrl["model"], "enum": names}
        # start < end (a validator): stated as start < 0.5 <= end.
        ctrl["start"]["exclusiveMaximum"], ctrl["end"]["minimum"] = 0.5, 0.5
        ctrl["start"].pop("maximum", None)


def _narrow_number(prop: dict[str, Any], **limits) -> None:
    targets = [s for s in prop.get("anyOf", []) if s.get("type") not in (None, "null")] or [prop]
    for t in targets:
        for k, v in limits.items():
            t[k] = min(t[k], v) if k in ("maximum", "maxLength") and k in t else v


def describe_a1111(schema: dict[str, Any], config) -> None:
    from serving.a1111 import SAMPLERS, SCHEDULER_ITEMS

    lim = [m.engine.limits for m in config.models]
    samplers = [None] + [n for s in SAMPLERS for n in (s.name, *s.aliases)]
    # Karras exists for some samplers only (GET /sdapi/v1/samplers): the enum lists the schedulers every sampler has.
    schedulers = [None] + [n for s in SCHEDULER_ITEMS if s["name"] != "karras" for n in (s["name"], s["label"])]
    names = config.model_names
    cnets = controlnet_names(config)
    for comp in ("Txt2ImgRequest", "Img2ImgRequest"):
        props = _comp(schema, comp).get("properties", {})
        if not props:
            continue
        for name, values in OFF_VALUES.items():
            _set(props, name, {"enum": values})
        for name in EMPTY_LISTS:
            nullable = any(v.get("type") == "null" for v in props.get(name, {}).get("anyOf", []))
            empty = {"type": "array", "maxItems": 0}
            _set(props, name, {"anyOf": [empty, {"type": "null"}]} if nullable else empty)
        _set(props, "sampler_name", {"enum": samplers})
        _set(props, "sampler_index", {"enum": samplers})
        _set(props, "scheduler", {"enum": schedulers})
        props["prompt"]["pattern"] = r"\S"
        required = _comp(schema, comp).setdefault("required", [])
        if "prompt" not in required:  # A1111's default "" is refused: a prompt is needed
            required.append("prompt")
        for text in ("prompt", "negative_prompt"):  # the smallest limit: override_settings may pick any model
            _narrow_number(props[text], maxLength=min(x.max_prompt_chars for x in lim))
        for side, key in (("width", "max_width"), ("height", "max_height")):
            _narrow_number(props[side], maximum=min(getattr(x, key) for x in lim))
        _narrow_number(props["steps"], maximum=min(x.max_steps for x in lim))
        _narrow_number(props["batch_size"], maximum=min(x.max_images_per_request for x in lim))
        _set(props, "n_iter", {"type": "integer", "minimum": 1, "maximum": 1, "description": "Batches: "
             "batch_size x n_iter <= the model's max_images_per_request (stated here as n_iter 1)."})
        _set(props, "override_settings", {"anyOf": [{"type": "object", "properties": {
            "sd_model_checkpoint": {"enum": names}}}, {"type": "null"}]})
        unit = {"type": "object", "required": ["image", "model"], "properties": {
            "enabled": {"type": "boolean"}, "image": _image("Conditioning image.", False),
            "model": {"enum": cnets}, "module": {"enum": ["none", "canny"]},
            "weight": {"type": "number", "minimum": 0, "maximum": 5},
            "guidance_start": {"type": "number", "minimum": 0, "exclusiveMaximum": 0.5},
            "guidance_end": {"type": "number", "minimum": 0.5, "maximum": 1},
            "control_mode": {"enum": [0, "Balanced"]}}}
        _set(props, "alwayson_scripts", {"type": "object", "additionalProperties": False, "properties": {
            "controlnet": {"type": "object", "required": ["args"], "properties": {
                "args": {"type": "array", "maxItems": 4 if cnets else 0, "items": unit}}}}} if cnets else
             {"type": "object", "maxProperties": 0, "description": "No ControlNet is configured here: must be "
                                                                 "empty."})
        if comp == "Img2ImgRequest":
            required.append("init_images")
            _set(props, "init_images", {"type": "array", "minItems": 1, "maxItems": 1,
                                        "items": {"type": "string", "format": IMAGE_FORMAT}})
            _set(props, "mask", _image("Inpainting mask (white = repaint), the init image's size.", True))
            _set(props, "inpainting_fill", {"enum": [0, 1]})
            _set(props, "resize_mode", {"enum": [0, 1]})
            rule = img2img_steps(config)["properties"]  # int(steps x denoising_strength) >= 1
            _narrow_number(props["denoising_strength"], minimum=rule["strength"]["anyOf"][0]["minimum"])
            _narrow_number(props["steps"], minimum=rule["steps"]["anyOf"][0]["minimum"])
    options = schema.get("paths", {}).get("/sdapi/v1/options", {}).get("post", {})
    if options:
        options["requestBody"]["content"]["application/json"]["schema"] = {
            "type": "object", "additionalProperties": False,
            "properties": {"sd_model_checkpoint": {"enum": names}}}


def describe_edits(schema: dict[str, Any], config, size_limits: dict[str, Any], limits: dict[str, Any]) -> None:
    """POST /v1/images/edits: typed form fields (OpenAI clients send them as strings) and image files."""
    from serving.openai_edits import OpenAIEditRequest

    op = schema.get("paths", {}).get("/v1/images/edits", {}).get("post")
    if not op:
        return
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    js = OpenAIEditRequest.model_json_schema()
    props = {k: v for k, v in js["properties"].items()}
    props["image"] = {"type": "string", "format": IMAGE_FILE_FORMAT, "description": form["properties"]["image"]
                      ["description"]}
    props["mask"] = {"type": "string", "format": ALPHA_MASK_FORMAT,
                     "description": form["properties"]["mask"]["description"]}
    for name, key in (("prompt", "prompt"), ("steps", "steps"), ("n", "num_images"), ("scheduler", "scheduler"),
                      ("model", "model")):
        limit = dict(limits[key])
        limit.pop("description_add", None)
        if "enum" in limit:
            props[name] = {"anyOf": [{"enum": limit["enum"]}, {"type": "null"}], "description":
                           props[name].get("description", "")}
        else:
            _narrow_number(props[name], **limit)
    rule = img2img_steps(config)["properties"]  # an edit is img2img: int(steps x strength) >= 1
    _narrow_number(props["steps"], minimum=rule["steps"]["anyOf"][0]["minimum"])
    _narrow_number(props["strength"], minimum=rule["strength"]["anyOf"][0]["minimum"])
    props["strength"] = {k: v for k, v in props["strength"].items()}
    for sub in props["strength"].get("anyOf", []):
        sub.pop("exclusiveMinimum", None)
    size = dict(size_limits)
    props["size"] = {"anyOf": [{"type": "string", **{k: v for k, v in size.items() if k != "description_add"}},
                               {"type": "null"}], "description": "'WxH' or 'auto' (the image's size)." +
                     size.get("description_add", "")}
    props["response_format"] = {"anyOf": [{"enum": ["b64_json"]}, {"type": "null"}], "description": "b64_json; "
                                "'url' gets 400 (no result store)."}
    props["stream"] = {"anyOf": [{"enum": [False]}, {"type": "null"}], "description": "Accepted and ignored."}
    form.update({"type": "object", "required": ["image", "prompt"], "additionalProperties": False,
                 "properties": {k: _no_null(v) for k, v in props.items()}})


def _no_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A form field is present or absent, never null: the schema without its null variant."""
    prop = {k: v for k, v in prop.items() if k != "default" or v is not None}
    if "enum" in prop:
        prop["enum"] = [v for v in prop["enum"] if v is not None]
    if "anyOf" in prop:
        rest = [_no_null(s) for s in prop["anyOf"] if s.get("type") != "null"]
        prop.pop("anyOf")
        prop.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
    return prop
