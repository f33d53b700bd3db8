"""Asynchronous generation jobs: submit, poll/stream progress, fetch results, cancel (docs/serving.md#jobs)."""
