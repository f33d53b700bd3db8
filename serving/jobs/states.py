"""Job statuses: the one definition (records store `.value`; a StrEnum, so `status == "queued"` also holds)."""
from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"          # accepted, waiting for a worker (also after a requeue)
    RUNNING = "running"        # a worker streams it through a model deployment
    CANCELLING = "cancelling"  # cancel requested while running: stops at its next denoising step
    SUCCEEDED = "succeeded"    # result stored
    FAILED = "failed"          # `error` says why
    CANCELLED = "cancelled"    # by its owner (queued: never ran; running: stopped at a step)


TERMINAL = frozenset({JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value})
ACTIVE = frozenset({JobStatus.RUNNING.value, JobStatus.CANCELLING.value})  # a worker holds the job


class JobRejected(Exception):
    """A submit the store refused (queue full, quota): rendered with `status` (+ Retry-After when set)."""

    def __init__(self, status: int, message: str, code: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after_s = status, message, code, retry_after_s
