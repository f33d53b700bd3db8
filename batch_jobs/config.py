"""Batch job configuration: the engine config, per-row defaults and how the job runs.

A job YAML holds `engine:` (an EngineConfig) plus the keys below; CLI flags override them.
Importing this module stays cheap (no torch, no Ray).
"""
from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field

from core.config import EngineConfig, Strict, load_yaml
from core.resources import engine_for_actor
from core.schemas import MAX_SEED, OutputFormat

# Input columns a prompt set may carry: the GenerationRequest fields plus the row's id. The image fields
# (init_image, mask_image: a URI string, base64 or a binary column; control: a list of structs or a JSON string)
# are read from any fsspec URI the row names: batch inputs are the job owner's own data.
REQUEST_COLUMNS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "scheduler", "seed",
                   "num_images", "output_format", "model", "init_image", "strength", "mask_image", "mask_blur",
                   "control", "loras")  # loras: list<struct<name, weight>>
IMAGE_COLUMNS = ("init_image", "mask_image")
INPUT_COLUMNS = ("id",) + REQUEST_COLUMNS


class RowDefaults(Strict):
    """Values for request fields a row leaves empty (null); what is still empty falls to the engine's defaults."""

    negative_prompt: str | None = Field(None, max_length=10_000, description="Negative prompt.")
    width: int | None = Field(None, ge=64, le=8192, multiple_of=8, description="Width in pixels.")
    height: int | None = Field(None, ge=64, le=8192, multiple_of=8, description="Height in pixels.")
    steps: int | None = Field(None, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="CFG scale.")
    scheduler: str | None = Field(None, max_length=64, description="Scheduler name.")
    num_images: int | None = Field(None, ge=1, le=64, description="Images per row.")
    output_format: OutputFormat | None = Field(None, description="png | jpeg | webp (default png).")


class BatchJobConfig(Strict):
    engine: EngineConfig = Field(default_factory=EngineConfig, description="The model every actor loads.")
    defaults: RowDefaults = Field(default_factory=RowDefaults, description="Per-row fallbacks.")
    job_seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of rows without one: "
                          "blake2b(job_seed, id), so the same input gives the same images on every run.")
    concurrency: int = Field(1, ge=1, le=4096, description="Engine actors (the actor pool size).")
    num_gpus: float | None = Field(None, ge=0, le=8, description="GPUs per actor (0.5 puts two actors on a "
                                   "GPU). Default: 1 when the cluster has GPUs and engine.device is not "
                                   "cpu, else 0 (core.resources, the rule Serve replicas follow too).")
    num_cpus: float | None = Field(None, ge=0, le=256, description="CPUs reserved per actor. Default: 1, less "
                                   "when the cluster is too small to also run the read/write tasks.")
    batch_size: int = Field(32, ge=1, le=4096, description="Rows per engine call (map_batches batch_size). The "
                            "engine's step scheduler runs their images in shared UNet calls of <= "
                            "limits.max_batch_size images (a finished image's slot is refilled at the next step) "
                            "and encodes finished images while the GPU runs on, so a few times max_batch_size "
                            "keeps the GPU busy.")
    rows_per_part: int | None = Field(None, ge=1, le=1_000_000, description="Rows per output part (the unit "
                                      "of resume: a killed run redoes at most the parts in flight). Default: "
                                      "4 x batch_size.")
    actor_threads: int = Field(1, ge=1, le=8, description="Batches one actor runs at once. 2 overlaps a batch's "
                               "last image encoding with the next batch's GPU work (more VRAM).")
    actor_restarts: int = Field(0, ge=-1, le=100, description="Restarts of an engine actor that dies (its node "
                                "lost, its process killed). 0: the run fails at once with the actor's error (a "
                                "rerun resumes). -1 (Ray Data's default): restart forever; only for autoscaling "
                                "clusters, since on a fixed cluster the restart waits for resources that never come "
                                "and the run hangs.")
    output_mode: Literal["parquet", "files"] = Field("parquet", description="parquet: images inside Parquet "
                                                     "parts; files: image files + a Parquet manifest.")
    unknown_columns: Literal["error", "ignore"] = Field("error", description="Input columns that are not "
                                                       "request fields: refuse the job, or ignore them.")

    @property
    def part_rows(self) -> int:
        return self.rows_per_part or 4 * self.batch_size

    def apply_gpu_fraction(self) -> "BatchJobConfig":
        """The engine each actor loads (core.resources.engine_for_actor, as Serve replicas): an actor owning half a
        GPU caps its VRAM at half; one owning none runs an 'auto' engine on CPU. Unchanged while num_gpus is unset."""
        if self.num_gpus is None:
            return self
        return self.model_copy(update={"engine": engine_for_actor(self.engine, self.num_gpus)})


def load_job_config(path: str | os.PathLike | None = None, **overrides: Any) -> BatchJobConfig:
    """Read a job YAML (engine + job keys); overrides that are not None win (CLI flags)."""
    data: dict[str, Any] = load_yaml(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return BatchJobConfig.model_validate(data)
