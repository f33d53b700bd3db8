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

from batch_jobs.config import REQUEST_COLUMNS, RowDefaults
from core.config import format_validation_error
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


def to_request(row: dict[str, Any], defaults: RowDefaults, job_seed: int) -> GenerationRequest:
    """Validate one row with the shared schema. Raises GenerationError(kind='validation', field=...)."""
    fields = {k: row[k] for k in REQUEST_COLUMNS if row.get(k) is not None}
    for key, value in defaults.model_dump(exclude_none=True).items():
        fields.setdefault(key, value)
    if fields.get("seed") is None:
        fields["seed"] = derived_seed(job_seed, row["id"])
    try:
        return GenerationRequest(**fields)
    except ValidationError as err:
        first = err.errors()[0].get("loc", ()) if err.errors() else ()
        raise GenerationError(format_validation_error(err), ErrorKind.VALIDATION,
                              str(first[0]) if first else None) from None


def _input_json(row: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in row.items() if k != "id"}, default=str, sort_keys=True)


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
