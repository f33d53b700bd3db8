"""`run_batch`: stream a Parquet prompt set through an actor pool of engines with Ray Data, resumably.

read_parquet -> map_batches(GenerateImages, actor pool) -> BatchOutputSink, with Ray Data's checkpointing on
the `id` column so a rerun on the same OUTPUT skips committed ids. Before and after, the driver reads the id
columns only, to report (and verify) that input rows = ok + failed + skipped.
"""
from __future__ import annotations

import logging
import posixpath
import time
import warnings
from typing import Any

from batch_jobs.config import BatchJobConfig, load_job_config
from batch_jobs.inputs import scan_prompt_set
from batch_jobs.paths import OutputLayout, arrow_filesystem, is_local, parquet_parts, read_column, read_json, \
    write_json

log = logging.getLogger(__name__)
# Settings that decide the images: a resume with different ones would mix two jobs in one OUTPUT.
FINGERPRINT_KEYS = ("engine.name", "engine.source", "engine.scheduler", "engine.defaults", "defaults", "job_seed",
                    "output_mode")


def checkpoint_uri(output: str) -> str:
    """Ray Data's checkpoint lives next to OUTPUT: its recovery scans the sink's folder for part files to
    delete, so the checkpoint files must not be inside it."""
    from fsspec.core import split_protocol

    protocol, path = split_protocol(output.rstrip("/"))
    path = path.strip("/")
    if not path or (protocol not in (None, "file", "local") and "/" not in path):
        raise ValueError(f"output {output!r}: use a folder below the bucket/filesystem root")
    return output.rstrip("/") + ".checkpoint"


def _fingerprint(job: BatchJobConfig) -> dict[str, Any]:
    data = job.model_dump(mode="json")
    out = {}
    for key in FINGERPRINT_KEYS:
        value: Any = data
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def _check_same_job(layout: OutputLayout, job: BatchJobConfig) -> None:
    previous = read_json(layout.fs, layout.job_path)
    current = _fingerprint(job)
    if previous is None:
        write_json(layout.fs, layout.job_path, current)
        return
    differing = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    if differing:
        raise ValueError(f"output {layout.root!r} holds a job with different settings ({', '.join(differing)}); "
                         "resume with the same config or use a new OUTPUT")


def _clean_temporaries(layout: OutputLayout) -> None:
    """Hidden .tmp files are parts a killed run was writing; they were never committed."""
    for folder in ("data", "manifest", "errors", "images"):
        path = layout.join(folder)
        if layout.fs.isdir(path):
            for f in layout.fs.ls(path, detail=False):
                name = posixpath.basename(f)
                if name.startswith(".") and name.endswith(".tmp"):
                    layout.fs.rm(f)


def committed_ids(output: str) -> set:
    """Ids Ray Data's checkpoint has committed (pending ones belong to parts that will be deleted)."""
    from batch_jobs.paths import url_to_fs

    fs, path = url_to_fs(checkpoint_uri(output))
    if not fs.isdir(path):
        return set()
    files = [f for f in fs.ls(path, detail=False) if f.endswith(".parquet") and not f.endswith(".pending.parquet")]
    return set(read_column(fs, files, "id").to_pylist())


def output_counts(layout: OutputLayout) -> dict[str, Any]:
    """Ids (and images) present in the output's committed parts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    fs = layout.fs
    rows = parquet_parts(fs, layout.rows_dir)
    ids = read_column(fs, rows, "id")
    idx = read_column(fs, rows, "image_index")
    pairs = pa.table({"id": ids, "i": idx}) if len(ids) else None
    dup_images = 0 if pairs is None else len(ids) - pairs.group_by(["id", "i"]).aggregate([]).num_rows
    err_files = parquet_parts(fs, layout.errors_dir)
    err_ids = read_column(fs, err_files, "id")
    kinds = read_column(fs, err_files, "error_kind")
    by_kind = {} if not len(kinds) else {
        v["values"]: v["counts"] for v in pc.value_counts(kinds).to_pylist()}
    err_list = err_ids.to_pylist()
    id_list = ids.to_pylist()
    return {"ok_ids": set(id_list), "id_list": id_list, "failed_ids": set(err_list), "images": len(ids),
            "duplicate_images": dup_images, "duplicate_error_rows": len(err_list) - len(set(err_list)),
            "errors_by_kind": by_kind}


def _fit_resources(job: BatchJobConfig) -> BatchJobConfig:
    """Fill num_gpus/num_cpus for this cluster (core.resources: the rules Serve replicas follow too)."""
    import ray

    from core.resources import actor_num_cpus, actor_num_gpus

    res = ray.cluster_resources()
    return job.model_copy(update={
        "num_gpus": actor_num_gpus(job.num_gpus, res.get("GPU", 0) > 0, job.engine.device),
        "num_cpus": actor_num_cpus(job.num_cpus, res.get("CPU", 0), job.concurrency)})


def _warn_if_cpus_short(job: BatchJobConfig, resuming: bool) -> None:
    """A resume adds Ray Data's CheckpointFilter: an actor that holds 1 CPU for the whole run. With the read and
    write tasks (1 CPU each) it needs a CPU beside it, or the run waits forever (Ray Data only logs "Cluster
    resources are not enough to run any task"). Say so up front; an autoscaling cluster may still add the CPUs."""
    import ray

    need = job.concurrency * (job.num_cpus or 0) + 1 + (1 if resuming else 0)
    have = ray.cluster_resources().get("CPU", 0)
    if have < need:
        log.warning("this %s needs >= %g CPUs in the cluster (%d engine actors x %g CPU, 1 for read/write tasks%s) "
                    "but the live nodes have %g: unless the cluster scales up, the run will wait forever",
                    "resume" if resuming else "run", need, job.concurrency, job.num_cpus or 0,
                    ", 1 held by Ray Data's CheckpointFilter actor" if resuming else "", have)


def write_empty_errors(layout: OutputLayout, id_type) -> None:
    """`OUTPUT/errors` always exists as a dataset (`pd.read_parquet(OUTPUT/errors)` works with no failed row):
    one empty part with the error rows' schema when no row failed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch_jobs.rows import ERROR_FIELDS

    if parquet_parts(layout.fs, layout.errors_dir):
        return
    schema = pa.schema([("id", id_type), ("prompt", pa.string())] + ERROR_FIELDS)
    layout.fs.makedirs(layout.errors_dir, exist_ok=True)
    with layout.fs.open(layout.join("errors/none.parquet"), "wb") as fh:
        pq.write_table(schema.empty_table(), fh)


def batch_demands(job: BatchJobConfig):
    """What the engine actors ask Ray for, with the flag (or job YAML key) that sets each resource."""
    from core.preflight import Demand

    return [Demand("engine actors", job.concurrency, {"CPU": job.num_cpus or 0, "GPU": job.num_gpus or 0},
                   {"GPU": "--num-gpus (num_gpus in the job YAML)",
                    "CPU": "--concurrency (concurrency / num_cpus in the job YAML)"})]


def pending_actor_messages(job: BatchJobConfig) -> list[str]:
    """Engine actors Ray has not started yet, with what each asks for and what is free (GCS only: the batch
    driver runs without a dashboard, so the state API is not there)."""
    import ray
    from ray._private import state  # the GCS actor table; ray.util.state needs the dashboard

    # Pid 0: no worker process yet, i.e. waiting for resources (an actor loading its model has one).
    pending = [a for a in state.actors().values()
               if a.get("State") in ("PENDING_CREATION", "DEPENDENCIES_UNREADY") and not a.get("Pid")
               and "MapWorker" in str(a.get("ActorClassName", ""))]
    if not pending:
        return []
    free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    return [f"{len(pending)} engine actor(s) not started yet; each asks for CPU {job.num_cpus or 0:g}, GPU "
            f"{job.num_gpus or 0:g}; free in the cluster now: {free} (change --num-gpus / --concurrency if this "
            "does not clear)"]


def run_batch(input: str, output: str, config: str | BatchJobConfig | None = None, *,
              concurrency: int | None = None, num_gpus: float | None = None, batch_size: int | None = None,
              rows_per_part: int | None = None, output_mode: str | None = None, address: str | None = None, job_seed: int | None = None,
              progress: bool = True, resource_check: bool = True) -> dict[str, Any]:
    """Run (or resume) a batch job and return its summary (also written to OUTPUT/summary.json).

    Connects to a running Ray (RAY_ADDRESS, `address`, or an already initialized one) or starts a local one.
    Raises InputError/ValueError for an unusable prompt set or config, ModelLoadError for a model source that
    cannot load here, ResourceError for actors the cluster cannot place (unless resource_check=False), all
    before any GPU time is spent.
    """
    started = time.time()
    job = config if isinstance(config, BatchJobConfig) else load_job_config(config)
    job = job.model_copy(update={k: v for k, v in dict(concurrency=concurrency, num_gpus=num_gpus,
                                                       batch_size=batch_size, rows_per_part=rows_per_part,
                                                       output_mode=output_mode,
                                                       job_seed=job_seed).items() if v is not None})
    job = BatchJobConfig.model_validate(job.model_dump())  # re-validate the overrides
    prompts = scan_prompt_set(input, job.unknown_columns)
    layout = OutputLayout.of(output, job.output_mode)
    ckpt = checkpoint_uri(output)
    _check_same_job(layout, job)
    _clean_temporaries(layout)
    input_ids = set(prompts.ids.to_pylist())
    done_before = committed_ids(output) & input_ids

    import os

    import ray

    from core.preflight import PendingWatcher, check_resources

    if address is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        from core.loading import check_source

        check_source(job.engine)  # local: the actors read the same paths and cache as this process

    started_ray = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
        started_ray = True
    try:
        job = _fit_resources(job).apply_gpu_fraction()
        if resource_check:
            check_resources(batch_demands(job), ray.cluster_resources())
        _warn_if_cpus_short(job, resuming=bool(committed_ids(output)))
        status, error = "complete", None
        try:
            if input_ids - done_before:  # all done already: do not load a model for nothing
                with PendingWatcher(lambda: pending_actor_messages(job), log.warning, every_s=30.0):
                    _execute(prompts, layout, ckpt, job, progress, input_ids - done_before)
        except BaseException as err:  # still report what was written; a rerun resumes
            status, error = "interrupted", f"{type(err).__name__}: {err}"
            _write_summary(input, output, layout, job, prompts.num_rows, input_ids, done_before, started, status,
                           error)
            raise
        write_empty_errors(layout, prompts.ids.type)
        return _write_summary(input, output, layout, job, prompts.num_rows, input_ids, done_before, started, status,
                              error)
    finally:
        if started_ray:
            ray.shutdown()


def _execute(prompts, layout: OutputLayout, ckpt: str, job: BatchJobConfig, progress: bool, todo_ids: set) -> None:
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from ray.data.checkpoint import CheckpointConfig

    from batch_jobs.generator import GenerateImages
    from batch_jobs.paths import url_to_fs
    from batch_jobs.progress import BatchProgress
    from batch_jobs.sink import BatchOutputSink

    ctx = DataContext.get_current()
    saved = ctx.checkpoint_config, ctx.enable_progress_bars
    ckpt_fs, ckpt_path = url_to_fs(ckpt)
    ctx.checkpoint_config = CheckpointConfig(
        id_column="id", checkpoint_path=ckpt_path if is_local(ckpt_fs) else ckpt_path,
        delete_checkpoint_on_success=False,  # it is the record of what is done: a rerun must skip it all
        override_filesystem=None if is_local(ckpt_fs) else arrow_filesystem(ckpt_fs))
    ctx.enable_progress_bars = False  # BatchProgress shows the job's own: rows, images/s, ETA, errors
    try:
        ds = ray.data.read_parquet(prompts.files, filesystem=arrow_filesystem(prompts.fs), columns=prompts.columns)
        # Small blocks stream: each becomes one engine task and one output part as soon as it is done
        # (a big Parquet file would otherwise be one block, written only at the very end).
        ds = ds.repartition(target_num_rows_per_block=job.part_rows)
        pool = ActorPoolStrategy(size=job.concurrency, max_concurrent_calls_per_actor=job.actor_threads)
        with warnings.catch_warnings():
            # Ray 2.60 deprecates extra remote args but has no named parameter for max_restarts yet (its actor pool
            # operator still documents `map_batches(..., max_restarts=0)`): silence that one warning, here only.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=Warning)
            ds = ds.map_batches(GenerateImages, fn_constructor_kwargs={"job": job},
                                batch_size=job.batch_size, batch_format="pyarrow", zero_copy_batch=True,
                                compute=pool, num_gpus=job.num_gpus or None, num_cpus=job.num_cpus,
                                # A dead actor fails the run (resumable) instead of waiting, with its tasks, for a
                                # restart that a fixed cluster may never be able to place.
                                max_restarts=job.actor_restarts)
        with BatchProgress(layout, todo_ids, enabled=progress):
            ds.write_datasink(BatchOutputSink(layout.root, filesystem=arrow_filesystem(layout.fs),
                                              mode=job.output_mode))
    finally:
        ctx.checkpoint_config, ctx.enable_progress_bars = saved


def _write_summary(input: str, output: str, layout: OutputLayout, job: BatchJobConfig, num_rows: int,
                   input_ids: set, done_before: set, started: float, status: str, error: str | None) -> dict:
    counts = output_counts(layout)
    ok_ids, failed_ids = counts["ok_ids"] & input_ids, counts["failed_ids"] & input_ids
    ok_now, failed_now = ok_ids - done_before, failed_ids - done_before
    images_now = sum(1 for i in counts["id_list"] if i in ok_now)
    wall = time.time() - started
    missing = len(input_ids - ok_ids - failed_ids)
    in_both = len(ok_ids & failed_ids)
    summary = {
        "status": status if not (status == "complete" and (missing or in_both or counts["duplicate_images"]))
        else "incomplete",
        "input": input, "output": output, "input_rows": num_rows,
        "ok_rows": len(ok_now), "failed_rows": len(failed_now), "skipped_rows": len(done_before),
        "images": images_now, "wall_s": round(wall, 3),
        "images_per_s": round(images_now / wall, 4) if wall > 0 else None,
        "total_ok_rows": len(ok_ids), "total_failed_rows": len(failed_ids), "total_images": counts["images"],
        "missing_rows": missing, "rows_in_both_outputs": in_both, "duplicate_images": counts["duplicate_images"],
        "errors_by_kind": counts["errors_by_kind"], "model": job.engine.name, "output_mode": job.output_mode,
        "concurrency": job.concurrency, "num_gpus": job.num_gpus, "num_cpus": job.num_cpus,
        "batch_size": job.batch_size, "rows_per_part": job.part_rows,
        "started_at": started, "error": error,
    }
    write_json(layout.fs, layout.summary_path, summary)
    return summary

