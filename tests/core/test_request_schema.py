"""GenerationRequest bounds: every bad field is an error that names the field."""
from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from core.config import format_validation_error
from core.schemas import MAX_SEED, ErrorKind, GenerationCancelled, GenerationError, GenerationRequest


def error_for(**data) -> str:
    data.setdefault("prompt", "a fox")
    with pytest.raises(ValidationError) as info:
        GenerationRequest(**data)
    return format_validation_error(info.value)


def test_minimal_request_leaves_model_defaults_open():
    req = GenerationRequest(prompt="a fox")
    assert req.width is None and req.seed is None and req.scheduler is None
    assert req.num_images == 1 and req.output_format == "png"


@pytest.mark.parametrize("data, field, why", [
    ({"width": 65}, "width", "multiple of 8"),
    ({"height": 100}, "height", "multiple of 8"),
    ({"width": 56}, "width", "greater than or equal to 64"),
    ({"height": 8200}, "height", "less than or equal to 8192"),
    ({"steps": 0}, "steps", "greater than or equal to 1"),
    ({"steps": 1001}, "steps", "less than or equal to 1000"),
    ({"guidance_scale": -1}, "guidance_scale", "greater than or equal to 0"),
    ({"guidance_scale": 51}, "guidance_scale", "less than or equal to 50"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"seed": MAX_SEED + 1}, "seed", str(MAX_SEED)),
    ({"num_images": 0}, "num_images", "greater than or equal to 1"),
    ({"num_images": 65}, "num_images", "less than or equal to 64"),
    ({"output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
    ({"negative_prompt": "x" * 10_001}, "negative_prompt", "at most 10000"),
    ({"model": "m" * 129}, "model", "at most 128"),
    ({"width": "wide"}, "width", "not a boolean or a string"),
    ({"seed": True}, "seed", "not a boolean"),  # strict: true is not 1
    ({"steps": "20"}, "steps", "not a boolean or a string"),
    ({"num_images": False}, "num_images", "not a boolean"),
    ({"guidance_scale": float("nan")}, "guidance_scale", "finite number"),  # not "must be <= 50"
    ({"guidance_scale": float("inf")}, "guidance_scale", "finite number"),
])
def test_bounds_name_the_field(data, field, why):
    text = error_for(**data)
    assert text.startswith(f"{field}:"), text
    assert why in text


@pytest.mark.parametrize("prompt, why", [("", "at least 1"), ("   \n\t", "blank"), ("p" * 10_001, "at most 10000")])
def test_prompt_blank_or_too_long(prompt, why):
    text = error_for(prompt=prompt)
    assert text.startswith("prompt:") and why in text


def test_prompt_required():
    with pytest.raises(ValidationError) as info:
        GenerationRequest()
    assert format_validation_error(info.value).startswith("prompt:")


def test_unknown_scheduler_lists_valid_names():
    text = error_for(scheduler="karras_9000")
    assert text.startswith("scheduler:") and "karras_9000" in text
    for name in ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "ddim", "lcm"):
        assert name in text


def test_extra_field_forbidden():
    text = error_for(sampler="euler")
    assert text.startswith("sampler:") and "Extra inputs are not permitted" in text


def test_edge_values_accepted():
    req = GenerationRequest(prompt="p" * 10_000, width=64, height=8192, seed=MAX_SEED, steps=1000, num_images=64,
                            guidance_scale=0, output_format="webp", scheduler="DPMPP_2M")
    assert req.scheduler == "dpmpp_2m" and req.seed == MAX_SEED


def test_round_trips_through_json():
    req = GenerationRequest(prompt="a fox", width=64, seed=7, output_format="jpeg")
    assert GenerationRequest.model_validate_json(req.model_dump_json()) == req


def test_errors_pickle_with_kind_and_field():
    err = pickle.loads(pickle.dumps(GenerationError("too wide", "validation", "width")))
    assert (err.message, err.kind, err.field) == ("too wide", "validation", "width")
    cancelled = pickle.loads(pickle.dumps(GenerationCancelled("client went away")))
    assert isinstance(cancelled, GenerationCancelled) and cancelled.kind == "cancelled"
    assert err.to_dict() == {"message": "too wide", "kind": "validation", "field": "width"}


def test_error_kind_is_an_enum_that_reads_as_its_string():
    import json

    err = GenerationError("too big", "capacity", "width")
    assert err.kind is ErrorKind.CAPACITY and err.kind == "capacity" and f"{err.kind}" == "capacity"
    assert json.loads(json.dumps(err.to_dict())) == {"message": "too big", "kind": "capacity", "field": "width"}
    again = pickle.loads(pickle.dumps(err))
    assert again.kind is ErrorKind.CAPACITY and again.field == "width"
    assert GenerationCancelled().kind is ErrorKind.CANCELLED
    assert GenerationError("x").kind is ErrorKind.INTERNAL
    with pytest.raises(ValueError):
        GenerationError("x", "bogus")  # a misspelt kind fails where it is raised, not as a wrong HTTP status


def test_json_numbers_stay_numbers():
    """Strict types still take what JSON and Parquet give: an integer for a float field, an integral float for an
    int field, numpy scalars from Parquet rows."""
    import numpy as np

    req = GenerationRequest.model_validate_json('{"prompt": "a", "guidance_scale": 7, "width": 64.0, "seed": 5}')
    assert req.guidance_scale == 7.0 and req.width == 64 and req.seed == 5
    req = GenerationRequest(prompt="a", seed=np.int64(9), guidance_scale=np.float32(2.5), num_images=np.int32(2))
    assert (req.seed, req.guidance_scale, req.num_images) == (9, 2.5, 2)
