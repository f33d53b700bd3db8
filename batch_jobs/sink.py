"""The Ray Data sink: one write task splits its rows into an image part and an errors part.

Parts are written under a hidden temporary name and renamed when complete (atomic on local and POSIX-like
filesystems; object stores publish a whole object at close anyway), so a reader never sees half a part.
File names start with Ray's per-task base name: with checkpointing on, Ray Data records the task's ids as
pending before the write and commits them after it; on the next run it deletes the part files of tasks
that never committed (matched by that prefix) and skips committed ids. That gives every id exactly once.
"""
from __future__ import annotations

import posixpath
import re
import hashlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME
from ray.data.block import BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink

from batch_jobs.rows import ERROR_FIELDS, IMAGE_FIELDS

ERROR_COLUMNS = ["id", "prompt"] + [name for name, _ in ERROR_FIELDS]
IMAGE_COLUMNS = ["id"] + [name for name, _ in IMAGE_FIELDS]
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def image_filename(row_id, index: int, fmt: str) -> str:
    """<id>-<i>.<ext>; ids that are not filename-safe get a short hash so two ids never share a file."""
    text = str(row_id)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:100].lstrip(".") or "_"
    if safe != text:
        safe += "-" + hashlib.blake2b(text.encode(), digest_size=4).hexdigest()
    return f"{safe}-{index}.{EXTENSIONS.get(fmt, fmt)}"


class BatchOutputSink(BlockBasedFileDatasink):
    def __init__(self, path: str, *, filesystem, mode: str = "parquet"):
        super().__init__(path, filesystem=filesystem, file_format="parquet")
        self.mode = mode

    def write_block(self, block: BlockAccessor, block_index: int, ctx) -> None:
        table: pa.Table = block.to_arrow()
        name = self.filename_provider.get_filename_for_task(ctx.kwargs[WRITE_UUID_KWARG_NAME], ctx.task_idx)
        failed = pc.is_valid(table["error"])
        images = table.filter(pc.invert(failed)).select(IMAGE_COLUMNS)
        errors = table.filter(failed).select(ERROR_COLUMNS)
        if images.num_rows:
            if self.mode == "files":
                images = self._write_image_files(images)
                self._write_part(images, posixpath.join(self.path, "manifest", name))
            else:
                self._write_part(images, posixpath.join(self.path, "data", name))
        if errors.num_rows:
            self._write_part(errors, posixpath.join(self.path, "errors", name))

    def _write_image_files(self, images: pa.Table) -> pa.Table:
        """Write each image as its own file; the manifest keeps the relative path instead of the bytes."""
        folder = posixpath.join(self.path, "images")
        self.filesystem.create_dir(folder, recursive=True)
        paths = []
        for row_id, index, fmt, data in zip(images["id"].to_pylist(), images["image_index"].to_pylist(),
                                            images["output_format"].to_pylist(), images["image"].to_pylist()):
            rel = posixpath.join("images", image_filename(row_id, index, fmt))
            self._atomic_write(posixpath.join(self.path, rel), lambda fh, d=data: fh.write(d))
            paths.append(rel)
        images = images.drop_columns(["image"])
        return images.append_column("file", pa.array(paths, pa.string()))

    def _write_part(self, table: pa.Table, path: str) -> None:
        self.filesystem.create_dir(posixpath.dirname(path), recursive=True)
        self._atomic_write(path, lambda fh: pq.write_table(table, fh, compression="zstd"))

    def _atomic_write(self, path: str, write) -> None:
        folder, base = posixpath.split(path)
        tmp = posixpath.join(folder, f".{base}.tmp")  # hidden: skipped by readers; cleaned up at job start
        with self.open_output_stream(tmp) as fh:
            write(fh)
        self.filesystem.move(tmp, path)
