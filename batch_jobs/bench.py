"""Ray Data batch throughput vs the engine's offline loop, from one run (the goal: ratio >= 0.95 on a GPU).

Both sides get the same prompt set (one compat key, so every call is a full batch), the same engine config and
the same rows per engine call. Throughput is steady state on both sides: images finished after the first
batch, over the time from the first batch's end to the last one's, so model load and warm-up (paid once per
actor) do not count. The Ray Data side runs first; its actors exit before the offline engine takes the GPU.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from batch_jobs.config import BatchJobConfig, load_job_config


def _steady_rate(finish_times: list[float], images_per_finish: list[int]) -> float | None:
    """Images after the first finished batch / time between the first and the last finished batch."""
    if len(finish_times) < 2:
        return None
    order = sorted(range(len(finish_times)), key=finish_times.__getitem__)
    span = finish_times[order[-1]] - finish_times[order[0]]
    images = sum(images_per_finish[i] for i in order[1:])
    return images / span if span > 0 else None


def ray_data_rate(output: str) -> float | None:
    """Steady-state images/s of a finished job, from its rows' generated_at (one value per engine batch)."""
    from collections import Counter

    from batch_jobs.paths import OutputLayout, parquet_parts, read_column

    layout = OutputLayout.of(output, "parquet")
    counts = Counter(read_column(layout.fs, parquet_parts(layout.fs, layout.rows_dir), "generated_at").to_pylist())
    return _steady_rate(list(counts), list(counts.values()))


def offline_rate(job: BatchJobConfig, rows: list[dict]) -> float | None:
    """The same rows through one Engine in this process, batch_size rows per generate call."""
    from batch_jobs.rows import to_request
    from core.engine import Engine
    from core.schemas import GenerationError

    engine = Engine(job.engine).load()
    try:
        finishes, images = [], []
        for start in range(0, len(rows), job.batch_size):
            reqs = [to_request(r, job.defaults, job.job_seed) for r in rows[start:start + job.batch_size]]
            outs = engine.generate(reqs)
            finishes.append(time.perf_counter())
            images.append(sum(len(o.images) for o in outs if not isinstance(o, GenerationError)))
        return _steady_rate(finishes, images)
    finally:
        del engine
        _free_gpu()


def _free_gpu() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def compare(config: str | BatchJobConfig | None = None, *, rows: int = 256, concurrency: int | None = None,
            num_gpus: float | None = None, batch_size: int | None = None, workdir: str | None = None,
            progress: bool = False) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch_jobs.prompts import sample_rows
    from batch_jobs.runner import run_batch

    job = config if isinstance(config, BatchJobConfig) else load_job_config(config)
    job = job.model_copy(update={k: v for k, v in dict(concurrency=concurrency, num_gpus=num_gpus,
                                                       batch_size=batch_size).items() if v is not None})
    # id + prompt only: every row takes the job/model defaults, so all rows share one compat key.
    table = [{"id": r["id"], "prompt": r["prompt"]} for r in sample_rows(rows, seed=1)]
    tmp = tempfile.TemporaryDirectory(prefix="sdserve-bench-batch-") if workdir is None else None
    root = Path(workdir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        prompts = str(root / "prompts.parquet")
        pq.write_table(pa.Table.from_pylist(table), prompts)
        out = str(root / f"out-{int(time.time())}")
        summary = run_batch(prompts, out, job, progress=progress)
        ray_rate = ray_data_rate(out)
        off_rate = offline_rate(job, table)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {
        "rows": rows, "batch_size": job.batch_size, "concurrency": summary["concurrency"],
        "num_gpus": summary["num_gpus"], "model": job.engine.name,
        "ray_data_images_per_s": ray_rate, "offline_images_per_s": off_rate,
        "ratio": (ray_rate / off_rate) if ray_rate and off_rate else None,
        "ray_data_wall_images_per_s": summary["images_per_s"], "ray_data_wall_s": summary["wall_s"],
        "ray_data_status": summary["status"], "failed_rows": summary["failed_rows"],
    }
