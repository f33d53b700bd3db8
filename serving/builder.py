"""The one builder: ServingConfig -> Serve application. Used by `sdserve serve`, `serve run
serving.app:app_builder config=...` and `serve deploy` YAMLs alike.

Modelled on Ray Serve LLM's build_llm_deployment: `model_deployment_options` computes every Serve option
from the config (inspectable in tests without GPUs), then the deployment is built with `.options(**opts)`.
"""
from __future__ import annotations

from typing import Any

from core.config import EngineConfig
from core.resources import actor_num_gpus, engine_for_actor
from serving.config import ModelConfig, ServingConfig, model_deployment_name


def resolve_num_gpus(model: ModelConfig, cluster_has_gpus: bool) -> float:
    """GPUs one replica of `model` reserves (core.resources.actor_num_gpus: the rule Ray Data actors follow too)."""
    return actor_num_gpus(model.deployment.num_gpus, cluster_has_gpus, model.engine.device)


def replica_engine_config(model: ModelConfig, num_gpus: float) -> EngineConfig:
    """The engine config a replica loads: VRAM budget within its GPU share; CPU when it holds no GPU."""
    return engine_for_actor(model.engine, num_gpus)


def model_deployment_options(model: ModelConfig, cluster_has_gpus: bool = False) -> dict[str, Any]:
    """Serve deployment options for one model, plus the replica's constructor kwargs under 'init_kwargs'."""
    d = model.deployment
    num_gpus = resolve_num_gpus(model, cluster_has_gpus)
    actor: dict[str, Any] = {"num_cpus": d.num_cpus, "num_gpus": num_gpus}
    if d.runtime_env:
        actor["runtime_env"] = d.runtime_env
    opts: dict[str, Any] = {
        "name": model_deployment_name(model.name),
        "ray_actor_options": actor,
        "max_ongoing_requests": d.max_ongoing_requests or 2 * model.engine.limits.max_batch_size,
        "max_queued_requests": d.max_queued_requests,
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s,
        "backpressure_config": {"status_code": 503, "retry_after_s": d.retry_after_s},
    }
    if d.autoscaling_config is not None:
        opts["autoscaling_config"] = d.autoscaling_config.model_dump(exclude_none=True)
    else:
        opts["num_replicas"] = d.num_replicas or 1
    engine = replica_engine_config(model, num_gpus)
    # The typed config itself is bound (Serve pickles it): the replica gets the object, nothing is re-validated.
    # Batching is the engine's step scheduler (engine.limits.max_batch_size): no @serve.batch options.
    opts["init_kwargs"] = {"engine_config": engine}
    return opts


def ingress_deployment_options(config: ServingConfig) -> dict[str, Any]:
    i = config.ingress
    return {"name": "ingress", "num_replicas": i.num_replicas, "ray_actor_options": {"num_cpus": i.num_cpus},
            "max_ongoing_requests": i.max_ongoing_requests, "max_queued_requests": i.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": 1.0},
            # Serve waits this long for the replica's requests before __del__ (the drain's job requeue) and kill.
            "graceful_shutdown_timeout_s": i.drain_timeout_s, "graceful_shutdown_wait_loop_s": 0.5}


def deployment_options(config: ServingConfig, cluster_has_gpus: bool = False) -> dict[str, dict[str, Any]]:
    """Every deployment's options by deployment name, as JSON (what `sdserve serve --dry-run` shows)."""
    out = {"ingress": ingress_deployment_options(config)}
    for m in config.models:
        opts = model_deployment_options(m, cluster_has_gpus)
        init = opts["init_kwargs"]
        opts["init_kwargs"] = {**init, "engine_config": init["engine_config"].model_dump(mode="json")}
        out[opts["name"]] = opts
    return out


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(config: ServingConfig | dict, cluster_has_gpus: bool | None = None):
    """The Serve application: one deployment per model behind the FastAPI ingress (plus job workers if on)."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    from serving.ingress import Ingress
    from serving.model_server import ModelServer

    config = ServingConfig.model_validate(config) if isinstance(config, dict) else config
    has_gpus = _cluster_has_gpus() if cluster_has_gpus is None else cluster_has_gpus
    logging_config = {"encoding": config.log_encoding}
    handles = {}
    for m in config.models:
        opts = model_deployment_options(m, has_gpus)
        init = opts.pop("init_kwargs")
        opts["backpressure_config"] = BackpressureConfig(**opts["backpressure_config"])
        dep = serve.deployment(ModelServer).options(**opts, logging_config=logging_config)
        handles[m.name] = dep.bind(**init)
    iopts = ingress_deployment_options(config)
    iopts["backpressure_config"] = BackpressureConfig(**iopts["backpressure_config"])
    return serve.deployment(Ingress).options(**iopts, logging_config=logging_config).bind(config, handles)
