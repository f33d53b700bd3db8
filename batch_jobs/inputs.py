"""Checking a prompt set before any GPU time is spent: columns, id uniqueness, row count. Driver-side."""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch_jobs.config import INPUT_COLUMNS
from batch_jobs.paths import list_parquet_files, read_column


class InputError(ValueError):
    """The prompt set as a whole is unusable (missing column, duplicate ids...): nothing runs."""


@dataclass
class PromptSet:
    fs: object
    files: list[str]
    ids: pa.ChunkedArray
    columns: list[str]  # the request columns to read (unknown ones dropped when ignored)

    @property
    def num_rows(self) -> int:
        return len(self.ids)


def scan_prompt_set(uri: str, unknown_columns: str = "error") -> PromptSet:
    fs, files = list_parquet_files(uri)
    names: list[str] | None = None
    for f in files:
        with fs.open(f, "rb") as fh:
            schema = pq.read_schema(fh)
        if names is not None and set(schema.names) != set(names):
            raise InputError(f"input {f}: columns {sorted(schema.names)} differ from {sorted(names)} in {files[0]}")
        names = schema.names
    assert names is not None
    missing = [c for c in ("id", "prompt") if c not in names]
    if missing:
        raise InputError(f"input {uri!r}: missing required column(s) {', '.join(missing)}; found {names}")
    unknown = [c for c in names if c not in INPUT_COLUMNS]
    if unknown and unknown_columns == "error":
        raise InputError(f"input {uri!r}: unknown column(s) {', '.join(unknown)}; valid: {', '.join(INPUT_COLUMNS)}"
                         " (set unknown_columns: ignore in the job config to skip them)")
    ids = read_column(fs, files, "id")
    if not (pa.types.is_integer(ids.type) or pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        raise InputError(f"input {uri!r}: column id must be integers or strings, got {ids.type}")
    if ids.null_count:
        raise InputError(f"input {uri!r}: column id has {ids.null_count} null value(s); every row needs an id")
    counts = pc.value_counts(ids)
    dupes = [str(v["values"]) for v in counts.to_pylist() if v["counts"] > 1]
    if dupes:
        raise InputError(f"input {uri!r}: column id must be unique; {len(dupes)} duplicated, e.g. "
                         + ", ".join(dupes[:5]))
    return PromptSet(fs, files, ids, [c for c in names if c in INPUT_COLUMNS])
