"""Import paths for Serve's own tooling.

    serve run serving.app:app_builder config=configs/serve-default.yaml
    serve deploy configs/serve-deploy.yaml          # import_path: serving.app:app_builder, args: {...}

`args` is either `{config: <path to a serving YAML>}` (plus optional top-level overrides) or a ServingConfig
given inline. `app` is the default application (embedded tiny-sd), for `serve run serving.app:app`.
"""
from __future__ import annotations

from typing import Any

from serving.builder import build_app
from serving.config import ServingConfig, load_serving_config


def config_from_args(args: dict[str, Any] | None) -> ServingConfig:
    args = dict(args or {})
    path = args.pop("config", None)
    if path is not None:
        return load_serving_config(path, **args)
    return ServingConfig.model_validate(args)


def app_builder(args: dict[str, Any]):
    """Serve calls this in its controller (`serve run`/`serve deploy`): a bad `args` raises one ValueError naming
    each key (what `serve status` then shows), not a pydantic traceback. `sdserve check` runs the same checks
    before anything is deployed."""
    from pydantic import ValidationError

    from core.config import format_validation_error

    try:
        config = config_from_args(args)
    except ValidationError as err:
        raise ValueError(f"sdserve config (args): {format_validation_error(err)}") from None
    return build_app(config)


def __getattr__(name: str):
    # `app` is built on first access (inside the Serve controller's import), so GPU detection sees the cluster.
    if name == "app":
        return build_app(ServingConfig())
    raise AttributeError(name)
