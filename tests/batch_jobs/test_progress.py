"""Batch progress (batch_jobs/progress.py): counts from committed parts, a tqdm bar on a TTY, plain lines otherwise."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from batch_jobs.paths import OutputLayout
from batch_jobs.progress import BatchProgress, OutputWatcher, Snapshot


def _part(directory, name: str, ids: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids}), directory / name)


def test_watcher_counts_this_runs_rows_images_and_errors(tmp_path):
    layout = OutputLayout.of(str(tmp_path / "out"))
    watcher = OutputWatcher(layout, todo_ids={"a", "b", "c", "d", "e"})
    watcher.poll()
    assert watcher.snapshot(1.0).rows_done == 0
    _part(tmp_path / "out" / "data", "p0.parquet", ["a", "a", "b", "old"])  # a: 2 images; "old": resumed row
    _part(tmp_path / "out" / "data", ".p1.parquet.tmp", ["c"])  # still being written: not counted
    _part(tmp_path / "out" / "errors", "e0.parquet", ["d"])
    watcher.poll()
    snap = watcher.snapshot(2.0)
    assert (snap.rows_done, snap.rows_total, snap.images, snap.failed_rows) == (3, 5, 3, 1)
    assert snap.images_per_s == 1.5 and snap.eta_s == 2.0 * 2 / 3
    _part(tmp_path / "out" / "data", "p1.parquet", ["c", "e"])
    watcher.poll()
    assert watcher.snapshot(3.0).rows_done == 5 and len(watcher._seen) == 3  # each part read once


def test_plain_lines_when_not_a_tty(tmp_path):
    layout = OutputLayout.of(str(tmp_path / "out"))
    _part(tmp_path / "out" / "data", "p0.parquet", ["a", "b"])
    out = io.StringIO()
    with BatchProgress(layout, {"a", "b", "c", "d"}, stream=out, tty=False, interval_s=3600, log_every_s=0):
        pass  # the final update runs on exit
    line = out.getvalue().strip()
    assert line.startswith("batch progress: 2/4 rows (50.0%), 2 images,") and "errors 0" in line and "ETA" in line
    assert "\r" not in out.getvalue()


def test_tqdm_bar_on_a_tty(tmp_path):
    layout = OutputLayout.of(str(tmp_path / "out"))
    _part(tmp_path / "out" / "data", "p0.parquet", ["a", "b", "c"])
    _part(tmp_path / "out" / "errors", "e0.parquet", ["d"])
    out = io.StringIO()
    with BatchProgress(layout, {"a", "b", "c", "d"}, stream=out, tty=True, interval_s=3600):
        pass
    bar = out.getvalue().split("\r")[-1]
    assert "batch" in bar and "4/4" in bar and "errors=1" in bar and "images/s" in bar


def test_disabled_prints_nothing(tmp_path):
    out = io.StringIO()
    with BatchProgress(OutputLayout.of(str(tmp_path / "out")), {"a"}, enabled=False, stream=out, tty=False):
        pass
    assert out.getvalue() == ""


def test_eta_unknown_before_the_first_row():
    assert Snapshot(0, 10, 0, 0, 5.0).eta_s is None and "ETA ?" in Snapshot(0, 10, 0, 0, 5.0).line()
