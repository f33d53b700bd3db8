"""Progress of a running batch job, watched from the driver: rows done / total, images/s, ETA, errors so far.

A thread reads the ids of the output's committed parts (each part once: only new files are read, one column) every
`interval_s`. The counts therefore come from what is durably written, the same source as the final summary, and
no actor or Ray Data internal is involved. On a terminal it draws a tqdm bar; otherwise (logs, CI, `ray job
submit`) it logs one plain line per `log_every_s`.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

from batch_jobs.paths import OutputLayout, parquet_parts, read_column

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    rows_done: int  # input rows with a committed outcome (ok or failed) in this run
    rows_total: int  # input rows this run has to do (resumed ones excluded)
    images: int  # images committed in this run
    failed_rows: int
    elapsed_s: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.rows_done == 0 or self.elapsed_s <= 0:
            return None
        return (self.rows_total - self.rows_done) * self.elapsed_s / self.rows_done

    def line(self) -> str:
        from tqdm import tqdm

        pct = 100.0 * self.rows_done / self.rows_total if self.rows_total else 100.0
        eta = "?" if self.eta_s is None else tqdm.format_interval(self.eta_s)
        return (f"batch progress: {self.rows_done}/{self.rows_total} rows ({pct:.1f}%), {self.images} images, "
                f"{self.images_per_s:.2f} images/s, errors {self.failed_rows}, elapsed "
                f"{tqdm.format_interval(self.elapsed_s)}, ETA {eta}")


class OutputWatcher:
    """Counts this run's committed outcomes in OUTPUT, reading each new part file's id column once."""

    def __init__(self, layout: OutputLayout, todo_ids: set):
        self.layout, self.todo = layout, todo_ids
        self._seen: dict[str, list] = {}  # part file -> its ids
        self.ok: set = set()
        self.failed: set = set()
        self.images = 0

    def poll(self) -> None:
        for directory, is_error in ((self.layout.rows_dir, False), (self.layout.errors_dir, True)):
            for part in parquet_parts(self.layout.fs, directory):
                if part in self._seen:
                    continue
                try:
                    ids = read_column(self.layout.fs, [part], "id").to_pylist()
                except FileNotFoundError:  # a part removed by a recovering run: it was never committed
                    continue
                self._seen[part] = ids
                mine = [i for i in ids if i in self.todo]
                if is_error:
                    self.failed.update(mine)
                else:
                    self.ok.update(mine)
                    self.images += len(mine)  # one data row per image

    def snapshot(self, elapsed_s: float) -> Snapshot:
        return Snapshot(len(self.ok | self.failed), len(self.todo), self.images, len(self.failed), elapsed_s)


class BatchProgress:
    """Context manager around the run: `with BatchProgress(layout, todo_ids): ds.write_datasink(...)`."""

    def __init__(self, layout: OutputLayout, todo_ids: set, *, enabled: bool = True, interval_s: float = 1.0,
                 log_every_s: float = 30.0, stream: IO[str] | None = None, tty: bool | None = None):
        self.watcher = OutputWatcher(layout, todo_ids)
        self.enabled, self.interval_s, self.log_every_s = enabled, interval_s, log_every_s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._started = 0.0
        self._last_log = 0.0

    def __enter__(self) -> "BatchProgress":
        if not self.enabled:
            return self
        self._started = self._last_log = time.monotonic()
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=len(self.watcher.todo), unit="row", desc="batch", file=self.stream,
                             dynamic_ncols=True, smoothing=0.1)
        self._thread = threading.Thread(target=self._loop, name="batch-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self.update(final=True)
        if self._bar is not None:
            self._bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.update()
            except Exception as err:  # progress must never break the job (e.g. a flaky object store listing)
                log.debug("batch progress poll failed: %s", err)

    def update(self, final: bool = False) -> Snapshot:
        self.watcher.poll()
        now = time.monotonic()
        snap = self.watcher.snapshot(now - self._started)
        if self._bar is not None:
            self._bar.n = snap.rows_done
            self._bar.set_postfix({"images/s": f"{snap.images_per_s:.2f}", "errors": snap.failed_rows},
                                  refresh=False)
            self._bar.refresh()
        elif final or now - self._last_log >= self.log_every_s:
            self._last_log = now
            print(snap.line(), file=self.stream, flush=True)
        return snap
