"""The map_batches UDF: a callable class holding one resident core Engine per actor.

No Ray import here: Ray Data instantiates the class once per actor and calls it with pyarrow batches.
"""
from __future__ import annotations

import logging

import pyarrow as pa

from batch_jobs.config import BatchJobConfig
from batch_jobs.rows import build_table, error_row, image_rows, now, to_request
from core.schemas import GenerationError

log = logging.getLogger(__name__)


class GenerateImages:
    def __init__(self, job: BatchJobConfig | dict):
        from core.engine import Engine

        self.job = job if isinstance(job, BatchJobConfig) else BatchJobConfig.model_validate(job)
        self.engine = Engine(self.job.engine).load()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        requests, positions, out_rows = [], [], {}
        for pos, row in enumerate(rows):
            try:
                requests.append(to_request(row, self.job.defaults, self.job.job_seed, self.job.engine.image_inputs))
                positions.append(pos)
            except GenerationError as err:
                out_rows[pos] = [error_row(row, err)]
        # The whole block to the engine at once: its step scheduler batches the rows' images into shared UNet
        # calls (any steps, scheduler, guidance and seed; one group per shape), up to limits.max_batch_size.
        try:
            outcomes = self.engine.generate(requests) if requests else []
        except Exception as err:  # noqa: BLE001 - an engine crash fails these rows, not the job
            log.exception("engine failed on a batch of %d rows", len(requests))
            outcomes = [GenerationError(f"generation failed: {type(err).__name__}: {err}", "internal")] * len(requests)
        finished = now()
        for pos, req, out in zip(positions, requests, outcomes):
            if isinstance(out, GenerationError):
                out_rows[pos] = [error_row(rows[pos], out)]
            else:
                out_rows[pos] = image_rows(rows[pos], req, out, finished)
        ordered = [r for pos in range(len(rows)) for r in out_rows[pos]]
        return build_table(ordered, batch.schema.field("id").type)
