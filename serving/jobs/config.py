"""Typed jobs configuration (the `jobs:` key of a ServingConfig). No Ray, no torch, no Redis imports."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config import Strict, default_cache_dir


class JobsConfig(Strict):
    backend: Literal["local", "redis"] = Field(
        "local", description="local: jobs run from the ingress process (no external server; a restart fails "
        "the unfinished ones). redis: Ray Serve task_consumer + Celery on Redis (durable, retried).")
    redis_url: str | None = Field(None, description="redis://host:port/db (backend redis).")
    queue_name: str = Field("sdserve-jobs", pattern=r"^[A-Za-z0-9_.-]+$", description="Broker queue name.")
    result_store: str = Field(default_factory=lambda: default_cache_dir() + "/jobs",
                              description="fsspec URI of results: a local dir, s3://bucket/prefix, gs://...")
    retention_s: float = Field(86400.0, gt=0, description="Job records and results are deleted after this.")
    max_retries: int = Field(2, ge=0, le=10, description="Re-runs of a job whose replica died.")
    concurrency: int = Field(4, ge=1, le=256, description="Jobs in flight per worker (they share the model's "
                             "dynamic batches).")
    worker_replicas: int = Field(1, ge=1, description="Job worker replicas (backend redis).")
    visibility_timeout_s: float = Field(3600.0, gt=0, description="Redis: a job whose worker died is delivered "
                                        "again after this (must exceed the longest job).")
    stale_after_s: float = Field(7200.0, gt=0, description="A running job with no progress for this long is "
                                 "failed ('worker lost'), so no job stays running forever.")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> "JobsConfig":
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend redis needs redis_url")
        if self.stale_after_s <= self.visibility_timeout_s and self.backend == "redis":
            raise ValueError("stale_after_s must exceed visibility_timeout_s (redelivery comes first)")
        return self
