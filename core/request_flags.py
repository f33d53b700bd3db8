"""Command-line flags generated from the request schema (`GenerationRequest`), so no CLI hand-copies a field,
its type, its description or its bounds. `sdserve generate`, `sdserve make-prompts` and `sdserve bench serve`
all add their request flags here; the values they collect go back through the schema for validation.

Stdlib + pydantic only (importing it must not import torch).
"""
from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Iterable

from core.schemas import GenerationRequest

NO_FLAG = ("prompt",)  # positional in every CLI that takes it


def _base_type(annotation: Any) -> Any:
    """int | None -> int; Literal[...] stays as is."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _bounds(field) -> str:
    """'64-8192, multiple of 8' from the field's annotated_types metadata."""
    lo = hi = step = None
    for meta in field.metadata:
        lo = getattr(meta, "ge", None) if getattr(meta, "ge", None) is not None else lo
        hi = getattr(meta, "le", None) if getattr(meta, "le", None) is not None else hi
        step = getattr(meta, "multiple_of", None) if getattr(meta, "multiple_of", None) is not None else step
    parts = []
    if lo is not None or hi is not None:
        parts.append(f"{'' if lo is None else lo}-{'' if hi is None else hi}")
    if step is not None:
        parts.append(f"multiple of {step}")
    return ", ".join(parts)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_request_flags(parser: argparse.ArgumentParser, fields: Iterable[str] | None = None,
                      exclude: Iterable[str] = (), help_suffix: dict[str, str] | None = None) -> list[str]:
    """Add one optional flag per request field (all but prompt and `exclude` by default); return the field
    names added.

    Every flag defaults to None (= leave the field to the model's defaults). Types, choices, help text and
    bounds come from the schema; validation stays in the schema (argparse only converts types).
    """
    names = [n for n in (fields or GenerationRequest.model_fields) if n not in NO_FLAG and n not in exclude]
    for name in names:
        field = GenerationRequest.model_fields[name]
        base = _base_type(field.annotation)
        kwargs: dict[str, Any] = {"default": None, "dest": name}
        if typing.get_origin(base) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(base))
        elif base in (int, float):
            kwargs["type"] = base
        bounds = _bounds(field)
        text = (field.description or "").rstrip(".")
        if bounds:
            text += f" [{bounds}]"
        if help_suffix and name in help_suffix:
            text += f" {help_suffix[name]}"
        kwargs["help"] = text.replace("%", "%%")
        parser.add_argument(flag_name(name), **kwargs)
    return names


def request_fields(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The request fields a user set on the command line (unset flags are left out, not sent as None)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
