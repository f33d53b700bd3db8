"""Typed serving configuration: which models, how each is deployed, and the HTTP front door.

One YAML file (or the `args:` of a `serve deploy` config) validates into `ServingConfig`. Importing this module
must stay cheap: no torch, no Ray.
"""
from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from core.config import EngineConfig, Strict, load_yaml
from core.image_fields import ImageInputLimits, UriAllowlist
from serving.jobs.config import JobsConfig

API_KEYS_ENV = "SDSERVE_API_KEYS"  # comma-separated; added to the configured keys


class AutoscalingOptions(Strict):
    """The subset of Ray Serve's autoscaling_config that matters here (passed through unchanged)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 allows scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time.")
    target_ongoing_requests: float = Field(4.0, gt=0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(10.0, ge=0, description="Sustained load before scaling up.")
    downscale_delay_s: float = Field(300.0, ge=0, description="Sustained idleness before scaling down.")

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingOptions":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class DeploymentOptions(Strict):
    """How one model is deployed: replicas, resources, queueing and dynamic batching."""

    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count (default 1 unless "
                                     "autoscaling_config is set; the two are exclusive).")
    autoscaling_config: AutoscalingOptions | None = Field(None, description="Ray Serve autoscaling.")
    num_gpus: float | Literal["auto"] = Field(
        "auto", description="GPU fraction per replica (ray_actor_options.num_gpus): 1, 0.5, 0.25... 'auto' = 1 "
        "when the Ray cluster has GPUs, else 0 (CPU). Also the replica's VRAM budget fraction.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests a replica holds at once (denoising + waiting for the engine's step "
        "scheduler to admit them). Default: 2 x the engine's limits.max_batch_size (images per UNet call), so "
        "requests are there to join the running batch as others finish.")
    max_queued_requests: int = Field(
        64, ge=1, description="Requests waiting for a replica, per caller; beyond it callers get 503 + "
        "Retry-After (the queue is never unbounded).")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with backpressure rejections.")
    health_check_period_s: float = Field(10.0, gt=0, description="Serve health-check period.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="Serve health-check timeout.")
    graceful_shutdown_timeout_s: float = Field(60.0, ge=0, description="Time to finish running requests.")
    runtime_env: dict[str, Any] | None = Field(None, description="Ray runtime_env for the replicas.")

    @model_validator(mode="after")
    def _exclusive_scaling(self) -> "DeploymentOptions":
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        return self

    @field_validator("num_gpus")
    @classmethod
    def _gpu_range(cls, value: float | str) -> float | str:
        if value != "auto" and not 0 <= value <= 8:
            raise ValueError("must be 'auto' or between 0 and 8 (fractions share a GPU)")
        return value


def model_deployment_name(model: str) -> str:
    """The Serve deployment name of a model (its name, with characters Serve rejects replaced)."""
    return "model-" + re.sub(r"[^A-Za-z0-9_-]", "_", model)


class ModelConfig(Strict):
    """One served model: its engine config and its deployment options."""

    engine: EngineConfig = Field(default_factory=EngineConfig, description="The engine (core.config).")
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")

    @property
    def name(self) -> str:
        return self.engine.name


class RateLimit(Strict):
    requests_per_minute: float = Field(..., gt=0, description="Sustained requests per minute per key (generation "
                                       "and job submits: POST).")
    burst: int = Field(10, ge=1, description="Requests allowed back to back before limiting.")
    reads_per_minute: float = Field(600.0, gt=0, description="Sustained reads (GET: job status, results, events, "
                                    "models) per minute per key: a budget of their own, so polling a job never "
                                    "uses up the generation budget.")
    read_burst: int = Field(60, ge=1, description="Reads allowed back to back before limiting.")


class AuthThrottle(Strict):
    max_failures: int = Field(10, ge=1, description="Failed authentications per client address within window_s; "
                              "beyond, the address gets 429 + Retry-After until the window passes.")
    window_s: float = Field(60.0, gt=0, description="Sliding window of the failure count.")


class SecurityConfig(Strict):
    api_keys: list[str] = Field(default_factory=list, description=f"Accepted Bearer keys (plus ${API_KEYS_ENV}). "
                                "None configured: no auth (local default).")
    rate_limit: RateLimit | None = Field(None, description="Per-key (or per-client-address without keys) "
                                         "token bucket, per ingress replica.")
    auth_failures: AuthThrottle = Field(default_factory=AuthThrottle, description="Throttling of failed "
                                        "authentication per client address (when API keys are on).")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest accepted request body (413 above).")
    prompt_blocklist: list[str] = Field(default_factory=list, description="Case-insensitive substrings; a "
                                        "prompt containing one gets 400.")

    @field_validator("api_keys")
    @classmethod
    def _non_empty(cls, keys: list[str]) -> list[str]:
        if any(not k.strip() for k in keys):
            raise ValueError("api keys must not be blank")
        return keys

    def effective_api_keys(self) -> list[str]:
        env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        return list(dict.fromkeys(self.api_keys + env))


class IngressOptions(Strict):
    num_replicas: int = Field(1, ge=1, description="HTTP ingress replicas.")
    num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per ingress replica (it mostly awaits).")
    max_ongoing_requests: int = Field(256, ge=1, description="Concurrent HTTP requests per ingress replica.")
    max_queued_requests: int = Field(512, ge=1, description="Requests queued at the proxy for the ingress.")
    request_timeout_s: float = Field(600.0, gt=0, description="Give up on a model call after this long (504).")
    drain_timeout_s: float = Field(30.0, ge=0, description="On shutdown (SIGTERM, redeploy): how long requests in "
                                   "flight may take to finish while new ones get 503; also the ingress's Serve "
                                   "graceful_shutdown_timeout_s (docs/deploy.md#draining).")


class ImageInputsConfig(Strict):
    """Input images on HTTP (init_image, mask_image, control[i].image): limits and which URIs may be named."""

    limits: ImageInputLimits = Field(default_factory=ImageInputLimits, description="Bytes and pixel limits, "
                                     "checked before decoding.")
    uri_allowlist: UriAllowlist = Field(default_factory=UriAllowlist, description="fsspec URI prefixes an HTTP "
                                        "request may name as an image; empty (default): only inline images.")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="Largest request "
                                "body (413 above) of the routes that take images (POST /v1/generate, /v1/jobs, "
                                "/v1/images/edits, /sdapi/v1/img2img, /sdapi/v1/txt2img); every other route keeps "
                                "security.max_body_bytes.")

    def uri_policy(self):
        """The core.image_inputs.UriPolicy for HTTP requests."""
        from core.image_inputs import UriPolicy

        return UriPolicy(prefixes=tuple(self.uri_allowlist.prefixes))


class ServingConfig(Strict):
    """The whole application: models (the first is the default) plus the HTTP ingress."""

    app_name: str = Field("sdserve", pattern=r"^[A-Za-z0-9_-]+$", description="Serve application name.")
    route_prefix: str = Field("/", description="HTTP route prefix of the application.")
    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig()], min_length=1,
                                      description="Served models; the first is the default.")
    ingress: IngressOptions = Field(default_factory=IngressOptions, description="HTTP ingress deployment.")
    security: SecurityConfig = Field(default_factory=SecurityConfig, description="Auth, limits, blocklist.")
    log_encoding: Literal["TEXT", "JSON"] = Field("JSON", description="Serve log encoding; JSON records carry "
                                                  "request_id, deployment and replica.")
    jobs: JobsConfig | None = Field(None, description="Asynchronous jobs /v1/jobs (None: off).")
    image_inputs: ImageInputsConfig = Field(default_factory=ImageInputsConfig, description="Input images "
                                            "(img2img, inpainting, ControlNet): limits and URI allowlist.")

    @model_validator(mode="after")
    def _unique_names(self) -> "ServingConfig":
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names: {', '.join(dupes)}")
        if self.jobs is not None and self.jobs.backend == "local" and self.ingress.num_replicas > 1:
            # Each replica would open its own SQLite file (other nodes) and answer 404 for the others' jobs.
            raise ValueError("jobs.backend local (one SQLite file) serves one ingress replica; use backend redis "
                             "with ingress.num_replicas > 1")
        return self

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def default_model(self) -> str:
        return self.models[0].name


def load_serving_config(path: str | os.PathLike | None = None, **overrides: Any) -> ServingConfig:
    """Read a ServingConfig from YAML (None: the embedded tiny-sd default). A bare engine config is accepted
    as a one-model app, so the engine YAMLs work here too."""
    data: dict[str, Any] = load_yaml(path) if path is not None else {}
    if "models" not in data and ("source" in data or "engine" in data):
        data = {"models": [{"engine": data.get("engine", data)}]}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ServingConfig.model_validate(data)
