"""Parquet rows with image inputs (issue 19): URIs (any fsspec URI), base64 strings and binary columns; control as
a list of structs or a JSON string; a bad image is this row's error naming the field, never an exception."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from batch_jobs.config import RowDefaults
from batch_jobs.rows import error_row, to_request
from core.schemas import GenerationError
from tests.serving.image_samples import b64, bad_images, half_mask, png


def test_uri_binary_and_base64_images_load_to_bytes(tmp_path):
    (tmp_path / "init.png").write_bytes(png())
    req = to_request({"id": 1, "prompt": "a", "init_image": f"file://{tmp_path}/init.png", "strength": 0.5,
                      "mask_image": half_mask()}, RowDefaults(), 0)
    assert req.init_image == png() and req.mask_image == half_mask() and req.strength == 0.5
    req = to_request({"id": 2, "prompt": "a", "init_image": b64(png())}, RowDefaults(), 0)
    assert req.init_image == b64(png())  # not a URI: left for the engine as it is


def test_control_as_list_of_structs_and_as_json(tmp_path):
    (tmp_path / "pose.png").write_bytes(png(seed=5))
    table = pa.table({"id": [1], "prompt": ["a"], "control": [[{"model": "pose", "image": f"file://{tmp_path}/pose.png",
                                                                  "scale": None, "preprocess": "canny"}]]})
    row = table.to_pylist()[0]  # what the actor sees: a struct's missing member is None
    req = to_request(row, RowDefaults(), 0)
    assert req.control[0].image == png(seed=5) and req.control[0].scale == 1.0 and req.control[0].preprocess == "canny"
    as_json = json.dumps([{"model": "pose", "image": b64(png(seed=5)), "scale": 0.5}])
    assert to_request({"id": 1, "prompt": "a", "control": as_json}, RowDefaults(), 0).control[0].scale == 0.5


@pytest.mark.parametrize("case", sorted(bad_images()))
def test_every_bad_image_is_an_error_row_naming_the_field(case):
    bad = bad_images()[case]
    row = {"id": 7, "prompt": "a", "init_image": png(), "control": [{"model": "pose", "image": bad}]}
    with pytest.raises(GenerationError) as info:
        to_request(row, RowDefaults(), 0)
    assert info.value.kind == "validation" and info.value.field == "control.0.image"
    out = error_row(row, info.value)
    assert out["error_field"] == "control.0.image" and "control.0.image" in out["error"]
    assert "bytes>" in out["input"] and len(out["input"]) < 2000  # images shown by size, not content


@pytest.mark.parametrize("row,field", [
    ({"init_image": "file:///no/such/file.png"}, "init_image"),
    ({"init_image": png(), "mask_image": half_mask(96, 64)}, "mask_image"),
    ({"strength": 0.5}, "strength"),  # needs init_image
    ({"init_image": png(), "control": "[{not json"}, "control"),
    ({"init_image": png(), "control": [{"model": "pose", "image": png(), "scale": 9}]}, "control.0.scale"),
])
def test_image_row_mistakes_name_the_field(row, field):
    with pytest.raises(GenerationError) as info:
        to_request({"id": 1, "prompt": "a", **row}, RowDefaults(), 0)
    assert info.value.field == field, info.value.message
