"""The refusal of an A1111-compatible request (shared by serving/a1111.py and its helpers)."""
from __future__ import annotations


class A1111Error(Exception):
    """A request A1111 semantics refuse: rendered as FastAPI's {"detail": [{loc, msg, type}]} with `status`."""

    def __init__(self, field: str | None, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.message, self.status = field, message, status
