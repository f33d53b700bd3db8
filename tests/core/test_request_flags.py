"""The CLIs' request flags come from GenerationRequest: every field, its type, choices, description and bounds."""
from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from core.request_flags import add_request_flags, flag_name, request_fields
from core.schemas import GenerationRequest


def parser_with_flags(**kw) -> tuple[argparse.ArgumentParser, list[str]]:
    p = argparse.ArgumentParser()
    return p, add_request_flags(p, **kw)


def test_every_request_field_but_prompt_gets_a_flag():
    p, names = parser_with_flags()
    assert set(names) == set(GenerationRequest.model_fields) - {"prompt"}
    options = {o for a in p._actions for o in a.option_strings}
    assert {flag_name(n) for n in names} <= options


def test_types_choices_and_bounds_come_from_the_schema():
    p, _ = parser_with_flags()
    actions = {a.dest: a for a in p._actions}
    assert actions["width"].type is int and actions["guidance_scale"].type is float
    assert actions["output_format"].choices == ["png", "jpeg", "webp"]
    assert "[64-8192, multiple of 8]" in actions["width"].help
    assert GenerationRequest.model_fields["steps"].description.rstrip(".") in actions["steps"].help


def test_only_set_flags_reach_the_request_and_the_schema_validates_them():
    p, names = parser_with_flags(exclude=("model",))
    assert "model" not in names
    args = p.parse_args(["--width", "96", "--seed", "3"])
    assert request_fields(args, names) == {"width": 96, "seed": 3}
    assert GenerationRequest(prompt="x", **request_fields(args, names)).width == 96
    with pytest.raises(ValidationError, match="width"):
        GenerationRequest(prompt="x", **request_fields(p.parse_args(["--width", "65"]), names))


def test_a_new_schema_field_needs_no_cli_edit(monkeypatch):
    """The CLIs list no field names of their own: sdserve generate's flags are exactly the schema's."""
    from sdserve.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    gen = sub.choices["generate"]
    dests = {a.dest for a in gen._actions}
    assert set(GenerationRequest.model_fields) - {"prompt", "model"} <= dests
