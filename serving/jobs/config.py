"""Typed jobs configuration (the `jobs:` key of a ServingConfig). No Ray, no torch, no Redis imports."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config import Strict, default_cache_dir


class JobsConfig(Strict):
    backend: Literal["local", "redis"] = Field(
        "local", description="local: jobs run from the ingress process (no external server; a restart fails "
        "the unfinished ones). redis: durable records + queue + leases in Redis, consumed by every ingress replica "
        "(jobs survive an ingress restart; a job whose worker died is retried, bounded, or failed with a reason).")
    redis_url: str | None = Field(None, description="redis://host:port/db (backend redis).")
    queue_name: str = Field("sdserve-jobs", pattern=r"^[A-Za-z0-9_.-]+$", description="Redis key prefix of the jobs' "
                            "records, queue and leases (backend redis).")
    result_store: str = Field(default_factory=lambda: default_cache_dir() + "/jobs",
                              description="fsspec URI of results: a local dir, s3://bucket/prefix, gs://...")
    retention_s: float = Field(86400.0, gt=0, description="Job records and results are deleted after this.")
    max_retries: int = Field(2, ge=0, le=10, description="Re-runs of a job whose replica died.")
    concurrency: int = Field(4, ge=1, le=256, description="Jobs in flight per worker (they share the model's "
                             "dynamic batches).")
    lease_s: float = Field(30.0, ge=1, description="Redis: a running job's lease, renewed every lease_s/3 by its "
                           "worker; a job whose lease lapsed (worker died) is queued again (bounded by max_retries) "
                           "or failed with the reason.")
    stale_after_s: float = Field(7200.0, gt=0, description="A running job with no progress for this long is "
                                 "failed ('stalled'), so no job stays running forever.")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> "JobsConfig":
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend redis needs redis_url")
        return self
