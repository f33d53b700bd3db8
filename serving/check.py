"""`sdserve check CONFIG`: validate a serving YAML or a `serve deploy` YAML before anything is deployed.

`serve deploy` accepts any file whose `args` are a mapping and reports a typo only later, as a traceback in
`serve status`. Here the file goes through the same validation as the deploy: Ray Serve's own
`ServeDeploySchema` for the deploy file, then our `ServingConfig` for each sdserve application's `args` (what
`serving.app:app_builder` builds from), then each model's source (what can be checked without loading weights).
"""
from __future__ import annotations

from typing import Any

APP_BUILDERS = ("serving.app:app_builder", "serving.app:app")
DEPLOY_KEYS = ("applications", "http_options", "proxy_location", "grpc_options", "logging_config",
               "target_capacity", "controller_options")


def _validation_text(err: Exception, prefix: str) -> str:
    from core.config import format_validation_error

    text = format_validation_error(err)
    return "; ".join(f"{prefix}{part}" for part in text.split("; ")) if prefix else text


def check_serving_data(data: dict[str, Any], where: str = "", check_sources: bool = True):
    """Validate one app's config mapping (a serving YAML's contents or a deploy file's `args`)."""
    from pydantic import ValidationError

    from core.loading import ModelLoadError, check_source
    from serving.app import config_from_args

    try:
        config = config_from_args(data)
    except (ValidationError, ValueError, OSError) as err:
        raise ValueError(_validation_text(err, where)) from None
    if check_sources:
        for m in config.models:
            try:
                check_source(m.engine)
            except ModelLoadError as err:
                raise ValueError(f"{where}{err}") from None
    return config


def check_config_file(path: str, check_sources: bool = True) -> list[str]:
    """Lines describing what was checked; ValueError naming the key path (and file) on the first problem."""
    from pydantic import ValidationError

    from core.config import load_yaml

    try:
        data = load_yaml(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
    if not any(key in data for key in DEPLOY_KEYS):
        config = check_serving_data(data, f"{path}: ", check_sources)
        return [f"{path}: ok: serving config, app {config.app_name!r}, models {', '.join(config.model_names)}"]
    from ray.serve.schema import ServeDeploySchema

    unknown = sorted(set(data) - set(ServeDeploySchema.model_fields))
    if unknown:  # Serve's schema ignores unknown top-level keys: a typo would silently drop a section
        raise ValueError(f"{path}: unknown top-level key(s) {', '.join(unknown)} (known: "
                         f"{', '.join(ServeDeploySchema.model_fields)})")
    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as err:
        raise ValueError(_validation_text(err, f"{path}: ")) from None
    lines = []
    for i, app in enumerate(data["applications"]):
        if app.get("import_path") not in APP_BUILDERS:
            lines.append(f"{path}: applications[{i}] ({app.get('name')}): not an sdserve app, not checked")
            continue
        config = check_serving_data(app.get("args") or {}, f"{path}: applications[{i}].args.", check_sources)
        if app.get("name") != config.app_name:
            raise ValueError(f"{path}: applications[{i}].name is {app.get('name')!r} but its args give app_name "
                             f"{config.app_name!r}: make them equal (handles look the app up by name)")
        lines.append(f"{path}: ok: applications[{i}] {app['name']!r}, models {', '.join(config.model_names)}")
    return lines
