"""Typed jobs configuration (the `jobs:` key of a ServingConfig). No Ray, no torch, no Redis imports."""
from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from core.config import Strict, default_cache_dir


class JobsConfig(Strict):
    backend: Literal["local", "redis"] = Field(
        "local", description="local: records and queue in an embedded SQLite file (no external server; jobs survive "
        "a restart of the server, one ingress replica). redis: records + queue + leases in Redis, consumed by every "
        "ingress replica. Both: a job whose worker died is queued again (bounded by max_retries) or failed with "
        "the reason; finished jobs keep their results.")
    redis_url: str | None = Field(None, description="redis://host:port/db (backend redis).")
    queue_name: str = Field("sdserve-jobs", pattern=r"^[A-Za-z0-9_.-]+$", description="Redis key prefix of the jobs' "
                            "records, queue and leases (backend redis).")
    result_store: str = Field(default_factory=lambda: default_cache_dir() + "/jobs",
                              description="fsspec URI of results: a local dir, s3://bucket/prefix, gs://...")
    database: str | None = Field(None, description="SQLite file of the records (backend local). Default: "
                                 "<result_store>/jobs.sqlite3 when the result store is a local dir, else "
                                 "<cache dir>/jobs.sqlite3. Must be on a local disk.")
    retention_s: float = Field(86400.0, gt=0, description="Finished job records and results are deleted after this.")
    result_max_bytes: int = Field(2 * 1024**3, ge=1024, description="Results beyond this total size are deleted, "
                                  "oldest first (their jobs then answer 410 for the result).")
    sweep_interval_s: float = Field(60.0, gt=0, description="How often retention runs (age and size).")
    max_queued: int = Field(1000, ge=1, description="Jobs waiting to run, all callers together; past it a submit "
                            "gets 503 + Retry-After.")
    max_unfinished_per_key: int = Field(100, ge=1, description="With API keys on: unfinished (queued or running) "
                                        "jobs per key; past it a submit gets 429.")
    queue_full_retry_after_s: float = Field(5.0, ge=0, description="Retry-After sent when the queue is full or a "
                                            "key is over its quota.")
    max_retries: int = Field(2, ge=0, le=10, description="Re-runs of a job whose replica or worker died.")
    concurrency: int = Field(4, ge=1, le=256, description="Jobs in flight per worker (they share the model's "
                             "dynamic batches).")
    lease_s: float = Field(30.0, ge=0.5, description="A running job's lease, renewed every lease_s/3 by its "
                           "worker; a job whose lease lapsed (worker died, server killed) is queued again "
                           "(bounded by max_retries) or failed with the reason.")
    stale_after_s: float = Field(7200.0, gt=0, description="A running job with no progress for this long is "
                                 "failed ('stalled'), so no job stays running forever.")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> "JobsConfig":
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend redis needs redis_url")
        return self

    def database_path(self) -> str:
        if self.database:
            return os.path.expanduser(self.database)
        store = self.result_store
        if store.startswith("file://"):
            store = store[len("file://"):]
        if "://" not in store:
            return os.path.join(os.path.expanduser(store), "jobs.sqlite3")
        return os.path.join(default_cache_dir(), "jobs.sqlite3")
