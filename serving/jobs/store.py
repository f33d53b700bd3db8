"""Job records (status, progress, timestamps, owner) and results (fsspec), with their bounds and retention.

Records live in SQLite (backend local: one file, durable across restarts, serving/jobs/sqlite_records.py) or in
Redis (backend redis: shared by every ingress replica, serving/jobs/redis_records.py); both offer the same
methods (create with the queue bound and per-key quota, atomic update, cancel flag, claim/renew/release leases).
Results are JSON files at `<result_store>/<job id>.json` on any fsspec URI, deleted by `sweep` after
`retention_s` or, oldest first, while they take more than `result_max_bytes`.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from serving.jobs.states import JobStatus

log = logging.getLogger("ray.serve")


def _store_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, sqlite3.OperationalError)


# The records backend cannot be reached (Redis down, SQLite file locked/unwritable): HTTP 503, not ready.
STORE_ERRORS = _store_errors()


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex


def make_records(cfg):
    if cfg.backend == "redis":
        from serving.jobs.redis_records import RedisRecords

        return RedisRecords(cfg.redis_url, cfg.queue_name)
    from serving.jobs.sqlite_records import SqliteRecords

    return SqliteRecords(cfg.database_path())


class JobStore:
    def __init__(self, cfg, records=None):
        import fsspec

        self.cfg = cfg
        self.records = records if records is not None else make_records(cfg)
        self.fs, self.root = fsspec.core.url_to_fs(cfg.result_store)
        self.fs.makedirs(self.root, exist_ok=True)

    # records
    def create(self, request: dict, owner: str | None, quota: int | None = None) -> dict:
        """Queue a new job. Raises JobRejected past `jobs.max_queued` (503) or the owner's quota (429)."""
        now = time.time()
        rec = {"id": new_job_id(), "status": JobStatus.QUEUED.value, "owner": owner, "request": request,
               "created_at": now, "started_at": None, "finished_at": None, "updated_at": now, "progress": None,
               "error": None, "attempts": 0, "seq": time.time_ns()}
        self.records.create(rec, self.cfg.retention_s, self.cfg.max_queued, quota)
        return rec

    def get(self, job_id: str) -> dict | None:
        return self.records.get(job_id)

    def update(self, job_id: str, expect=None, **fields: Any) -> dict | None:
        """Merge fields atomically. With `expect` (statuses), only when the job is in one of them. None otherwise."""
        fields = {k: (v.value if isinstance(v, JobStatus) else v) for k, v in fields.items()}
        fields["updated_at"] = time.time()
        expect = None if expect is None else {getattr(s, "value", s) for s in expect}
        return self.records.update(job_id, fields, self.cfg.retention_s, expect)

    def queue_position(self, rec: dict) -> int:
        return self.records.queue_position(rec)

    def request_cancel(self, job_id: str) -> None:
        self.records.request_cancel(job_id, self.cfg.retention_s)

    def cancel_requested(self, job_id: str) -> bool:
        return self.records.cancel_requested(job_id)

    def ping(self) -> None:
        """Raises when the records backend cannot be reached (readiness, error mapping)."""
        self.records.ping()

    # results
    def _path(self, job_id: str) -> str:
        return f"{self.root.rstrip('/')}/{job_id}.json"

    def write_result(self, job_id: str, result_json: dict) -> str:
        path = self._path(job_id)
        with self.fs.open(path, "w") as fh:
            json.dump(result_json, fh)
        return path

    def read_result(self, job_id: str) -> dict | None:
        try:
            with self.fs.open(self._path(job_id), "r") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None

    def sweep(self, now: float | None = None) -> dict[str, int]:
        """Retention: delete results older than retention_s, then the oldest while the rest exceed
        result_max_bytes; drop finished records older than retention_s. Returns what was deleted."""
        now = time.time() if now is None else now
        cutoff = now - self.cfg.retention_s
        files = []
        for info in self.fs.ls(self.root, detail=True):
            if not info["name"].endswith(".json") or info.get("type") == "directory":
                continue
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
            ts = mtime.timestamp() if hasattr(mtime, "timestamp") else (mtime or now)
            files.append((ts, int(info.get("size") or 0), info["name"]))
        files.sort()
        total = sum(size for _, size, _ in files)
        aged = by_bytes = 0
        for ts, size, name in files:
            if ts < cutoff:
                aged += 1
            elif total > self.cfg.result_max_bytes:
                by_bytes += 1
            else:
                continue
            try:
                self.fs.rm(name)
            except FileNotFoundError:
                pass
            total -= size
        records = len(self.records.delete_finished_before(cutoff))
        if aged or by_bytes or records:
            log.info("jobs: retention removed %d result(s) by age, %d by size, %d record(s)", aged, by_bytes, records)
        return {"results_by_age": aged, "results_by_bytes": by_bytes, "records": records}
