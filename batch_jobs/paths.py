"""fsspec URIs for inputs and outputs, and reading back ids. Driver-side; no Ray, no torch.

INPUT may be a file, a directory (every *.parquet below it) or a glob. OUTPUT is a directory:

    OUTPUT/data/*.parquet       image rows with PNG bytes       (output_mode=parquet)
    OUTPUT/images/<id>-<i>.png  + OUTPUT/manifest/*.parquet      (output_mode=files)
    OUTPUT/errors/*.parquet     failed rows: id + reason
    OUTPUT/_checkpoint/         Ray Data's checkpoint (ids committed with their part files)
    OUTPUT/summary.json         the last run's summary; OUTPUT/_job.json: settings that decide the images
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

GLOB_CHARS = "*?["


def url_to_fs(uri: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/") or "/"


def is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def arrow_filesystem(fs):
    """The pyarrow filesystem Ray Data and pyarrow use: native for local paths, else a wrapper of the fsspec one."""
    import pyarrow.fs as pafs

    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _visible(relative: str) -> bool:
    """Hidden (.x) and private (_x) files and folders are skipped, as pyarrow and Ray Data do."""
    return not any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def list_parquet_files(uri: str) -> tuple[Any, list[str]]:
    """(fsspec fs, sorted file paths) of an input file, directory or glob. Raises ValueError when none."""
    fs, path = url_to_fs(uri)
    if any(c in path for c in GLOB_CHARS):
        files = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isdir(path):
        files = [p for p in fs.find(path) if p.endswith(".parquet") and _visible(p[len(path):])]
    elif fs.isfile(path):
        files = [path]
    else:
        raise ValueError(f"input {uri!r}: no such file or directory")
    if not files:
        raise ValueError(f"input {uri!r}: no Parquet files found")
    return fs, sorted(files)


@dataclass(frozen=True)
class OutputLayout:
    fs: Any
    root: str
    mode: str = "parquet"

    @classmethod
    def of(cls, uri: str, mode: str = "parquet") -> "OutputLayout":
        fs, root = url_to_fs(uri)
        return cls(fs, root, mode)

    def join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    @property
    def rows_dir(self) -> str:  # where image rows (with or without bytes) land
        return self.join("data" if self.mode == "parquet" else "manifest")

    @property
    def images_dir(self) -> str:
        return self.join("images")

    @property
    def errors_dir(self) -> str:
        return self.join("errors")

    @property
    def checkpoint_dir(self) -> str:
        return self.join("_checkpoint")

    @property
    def summary_path(self) -> str:
        return self.join("summary.json")

    @property
    def job_path(self) -> str:
        return self.join("_job.json")


def parquet_parts(fs, directory: str) -> list[str]:
    if not fs.isdir(directory):
        return []
    return sorted(p for p in fs.find(directory) if p.endswith(".parquet") and _visible(p[len(directory):]))


def read_column(fs, files: list[str], column: str) -> pa.ChunkedArray:
    """One column of many Parquet files (only that column is read)."""
    arrays = []
    for f in files:
        with fs.open(f, "rb") as fh:
            arrays.extend(pq.read_table(fh, columns=[column]).column(column).chunks)
    return pa.chunked_array(arrays) if arrays else pa.chunked_array([], type=pa.null())


def read_json(fs, path: str) -> dict | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return json.load(fh)


def write_json(fs, path: str, data: dict) -> None:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
