"""Parquet rows <-> GenerationRequests and output rows. Pure Python + pyarrow: no Ray, no torch.

Each input row is one GenerationRequest (the same schema as HTTP). Output: one row per image, keyed by
(id, image_index); a failed row becomes one error row with the reason.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Iterable

import pyarrow as pa
from pydantic import ValidationError

from batch_jobs.config import IMAGE_COLUMNS, REQUEST_COLUMNS, RowDefaults
from core.config import format_validation_error
from core.image_fields import ImageInputLimits
from core.schemas import MAX_SEED, ErrorKind, GenerationError, GenerationRequest, GenerationResult

# Columns of an image row (data parts / manifest) in order; `image` is dropped from a files-mode manifest.
IMAGE_FIELDS = [
    ("image_index", pa.int32()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("steps", pa.int32()), ("guidance_scale", pa.float64()),
    ("scheduler", pa.string()), ("seed", pa.int64()), ("num_images", pa.int32()), ("model", pa.string()),
    ("output_format", pa.string()), ("image", pa.binary()), ("batch_size", pa.int32()),
    ("denoise_s", pa.float64()), ("decode_s", pa.float64()), ("encode_s", pa.float64()),
    ("total_s", pa.float64()), ("generated_at", pa.float64()), ("note", pa.string()),
]
ERROR_FIELDS = [("error", pa.string()), ("error_kind", pa.string()), ("error_field", pa.string()),
                ("input", pa.string())]
# The map step emits both kinds in one table (nulls where they do not apply); the sink splits them.
COMBINED_FIELDS = IMAGE_FIELDS + ERROR_FIELDS


def derived_seed(job_seed: int, row_id: Any) -> int:
    """Seed of a row without one: stable across runs, machines and Python versions (unlike hash())."""
    digest = hashlib.blake2b(f"{job_seed}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (MAX_SEED + 1)


def _control_column(value: Any) -> Any:
    """`control` as a list of dicts: a JSON string is parsed; a list of structs loses its null members (so the
    schema's defaults apply to what a row's struct leaves empty)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise GenerationError(f"control: not valid JSON: {err}", ErrorKind.VALIDATION, "control") from None
    if isinstance(value, list):
        return [{k: v for k, v in c.items() if v is not None} if isinstance(c, dict) else c for c in value]
    return value


def load_row_images(req: GenerationRequest, limits: ImageInputLimits) -> GenerationRequest:
    """Read every image a row names (any fsspec URI: UriPolicy(allow_all=True)) and check it, so a missing file or
    a bad image is this row's error naming the field; URIs are replaced by their bytes (the engine reads none)."""
    from core.image_inputs import ANY_URI, classify_source, decode_request_images, load_bytes

    def loaded(source, field):
        if isinstance(source, str) and classify_source(source) == "uri":
            return load_bytes(source, field, limits, ANY_URI)
        return source

    update: dict[str, Any] = {k: loaded(getattr(req, k), k) for k in IMAGE_COLUMNS if getattr(req, k) is not None}
    if req.control:
        update["control"] = [c.model_copy(update={"image": loaded(c.image, f"control.{i}.image")})
                             for i, c in enumerate(req.control)]
    if not update:
        return req
    req = req.model_copy(update=update)
    decode_request_images(req.init_image, req.mask_image, [c.image for c in req.control], limits, ANY_URI)
    return req


def to_request(row: dict[str, Any], defaults: RowDefaults, job_seed: int,
               image_limits: ImageInputLimits | None = None) -> GenerationRequest:
    """Validate one row with the shared schema, images read and checked (image_limits: the engine's
    `image_inputs`). Raises GenerationError(kind='validation', field=...)."""
    fields = {k: row[k] for k in REQUEST_COLUMNS if row.get(k) is not None}
    if "control" in fields:
        fields["control"] = _control_column(fields["control"])
    for key, value in defaults.model_dump(exclude_none=True).items():
        fields.setdefault(key, value)
    if fields.get("seed") is None:
        fields["seed"] = derived_seed(job_seed, row["id"])
    try:
        req = GenerationRequest(**fields)
    except ValidationError as err:
        first = err.errors()[0].get("loc", ()) if err.errors() else ()
        raise GenerationError(format_validation_error(err), ErrorKind.VALIDATION, _field_of(first)) from None
    return load_row_images(req, image_limits or ImageInputLimits())


def _field_of(loc: tuple) -> str | None:
    """The request field an error's loc names: "control.0.scale" inside control, else its first part (a union's
    loc ends in the member type, e.g. ("init_image", "str"), which is no field)."""
    if not loc:
        return None
    if loc[0] == "control" and len(loc) >= 3:
        return ".".join(str(p) for p in loc[:3])
    return str(loc[0])


def _brief(value: Any) -> Any:
    """An input value as the error row's `input` JSON shows it: binary images by size, not by content."""
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, str) and len(value) > 1024:
        return value[:200] + f"... <{len(value)} chars>"
    if isinstance(value, list):
        return [_brief(v) for v in value]
    if isinstance(value, dict):
        return {k: _brief(v) for k, v in value.items()}
    return value


def _input_json(row: dict[str, Any]) -> str:
    return json.dumps({k: _brief(v) for k, v in row.items() if k != "id"}, default=str, sort_keys=True)


def image_rows(row: dict[str, Any], req: GenerationRequest, result: GenerationResult,
               finished_at: float) -> list[dict[str, Any]]:
    t = result.timings
    return [{
        "id": row["id"], "image_index": i, "prompt": req.prompt, "negative_prompt": req.negative_prompt,
        "width": result.width, "height": result.height, "steps": result.steps,
        "guidance_scale": result.guidance_scale, "scheduler": result.scheduler, "seed": img.seed,
        "num_images": req.num_images, "model": result.model, "output_format": result.output_format,
        "image": img.data, "batch_size": result.batch_size, "denoise_s": t.denoise_s, "decode_s": t.decode_s,
        "encode_s": t.encode_s, "total_s": t.total_s, "generated_at": finished_at, "note": result.note,
    } for i, img in enumerate(result.images)]


def error_row(row: dict[str, Any], err: GenerationError) -> dict[str, Any]:
    return {"id": row.get("id"), "prompt": row.get("prompt") if isinstance(row.get("prompt"), str) else None,
            "error": err.message, "error_kind": err.kind.value, "error_field": err.field, "input": _input_json(row)}


def build_table(rows: Iterable[dict[str, Any]], id_type: pa.DataType) -> pa.Table:
    """One table with a fixed schema, so blocks from every actor concatenate."""
    rows = list(rows)
    schema = pa.schema([("id", id_type)] + COMBINED_FIELDS)
    return pa.table({name: pa.array([r.get(name) for r in rows], type=typ) for name, typ in
                     zip(schema.names, schema.types)}, schema=schema)


def now() -> float:
    return time.time()
