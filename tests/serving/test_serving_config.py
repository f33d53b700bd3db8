"""ServingConfig, the computed deployment options and the security helpers: no Ray cluster, no GPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from core.config import EngineConfig, format_validation_error
from serving.builder import deployment_options, model_deployment_options
from serving.config import ServingConfig, load_serving_config
from serving.openai_api import OpenAIError, OpenAIImageRequest, parse_size, to_generation_request

CONFIGS = Path(__file__).parents[2] / "configs"


def test_default_config_is_one_cpu_tiny_model():
    cfg = ServingConfig()
    assert cfg.model_names == ["tiny-sd"] and cfg.default_model == "tiny-sd"
    opts = model_deployment_options(cfg.models[0], cluster_has_gpus=False)
    assert opts["ray_actor_options"]["num_gpus"] == 0
    engine = opts["init_kwargs"]["engine_config"]
    assert isinstance(engine, EngineConfig) and engine.device == "cpu"  # bound as the typed object
    assert opts["max_ongoing_requests"] == 16  # 2 x engine.limits.max_batch_size: requests wait to join
    assert opts["max_queued_requests"] == 64


def test_fractional_gpu_sets_actor_option_and_vram_budget_fraction():
    cfg = ServingConfig.model_validate({"models": [
        {"engine": {"name": "a"}, "deployment": {"num_gpus": 0.5}},
        {"engine": {"name": "b"}, "deployment": {"num_gpus": 0.25, "num_replicas": 4}}]})
    opts = deployment_options(cfg)
    assert opts["model-a"]["ray_actor_options"]["num_gpus"] == 0.5
    assert opts["model-a"]["init_kwargs"]["engine_config"]["memory"]["gpu_fraction"] == 0.5
    assert opts["model-b"]["init_kwargs"]["engine_config"]["memory"]["gpu_fraction"] == 0.25
    assert opts["model-b"]["num_replicas"] == 4
    json.dumps(opts)  # the dry-run view is plain JSON
    assert opts["model-a"]["init_kwargs"]["engine_config"]["device"] == "auto"  # the replica sees its GPU


def test_auto_gpus_follow_the_cluster():
    model = ServingConfig().models[0]
    assert model_deployment_options(model, cluster_has_gpus=True)["ray_actor_options"]["num_gpus"] == 1.0
    assert model_deployment_options(model, cluster_has_gpus=False)["ray_actor_options"]["num_gpus"] == 0.0


def test_autoscaling_passes_through_and_excludes_num_replicas():
    cfg = ServingConfig.model_validate({"models": [{"deployment": {
        "autoscaling_config": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 6}}}]})
    opts = model_deployment_options(cfg.models[0])
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"]["max_replicas"] == 3 and opts["autoscaling_config"]["min_replicas"] == 0
    with pytest.raises(ValidationError) as err:
        ServingConfig.model_validate({"models": [{"deployment": {"num_replicas": 2,
                                                                 "autoscaling_config": {"max_replicas": 3}}}]})
    assert "num_replicas or autoscaling_config" in format_validation_error(err.value)


@pytest.mark.parametrize("bad, names", [
    # The @serve.batch era's deployment keys are gone (the engine batches): an old config is told which key.
    ({"models": [{"deployment": {"max_batch_size": 8}}]}, "models.0.deployment.max_batch_size"),
    ({"models": [{"deployment": {"batch_wait_timeout_s": 0.01}}]}, "models.0.deployment.batch_wait_timeout_s"),
    ({"models": [{"deployment": {"num_gpus": 1.5e9}}]}, "num_gpus"),
    ({"models": [{"engine": {"name": "x"}}, {"engine": {"name": "x"}}]}, "duplicate model names: x"),
    ({"models": [{"deployment": {"max_batch_sizee": 8}}]}, "models.0.deployment.max_batch_sizee"),
    ({"security": {"rate_limit": {"requests_per_minute": 0}}}, "security.rate_limit.requests_per_minute"),
    ({"models": []}, "models"),
    ({"jobs": {"backend": "local"}, "ingress": {"num_replicas": 2}}, "use backend redis"),
    ({"jobs": {"max_queued": 0}}, "jobs.max_queued"),
])
def test_bad_configs_name_the_key(bad, names):
    with pytest.raises(ValidationError) as err:
        ServingConfig.model_validate(bad)
    assert names in format_validation_error(err.value)


def test_example_configs_validate(monkeypatch):
    for path in CONFIGS.glob("serve-*.yaml"):
        if path.name == "serve-deploy.yaml":
            continue
        cfg = load_serving_config(path)
        assert deployment_options(cfg, cluster_has_gpus=True)
    two = load_serving_config(CONFIGS / "serve-two-models-h100.yaml")
    gpus = [model_deployment_options(m, True)["ray_actor_options"]["num_gpus"] for m in two.models]
    assert gpus == [0.5, 0.25]


def test_serve_deploy_yaml_matches_serve_schema_and_our_builder():
    from ray.serve.schema import ServeDeploySchema

    from serving.app import config_from_args

    data = yaml.safe_load((CONFIGS / "serve-deploy.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(data)
    app = schema.applications[0]
    assert app.import_path == "serving.app:app_builder"
    assert config_from_args(app.args).model_names == ["tiny-sd"]
    assert config_from_args({"config": str(CONFIGS / "serve-default.yaml")}).model_names == ["tiny-sd"]


def test_build_app_without_gpus_gives_a_serve_application():
    from ray.serve import Application

    from serving.builder import build_app

    cfg = load_serving_config(CONFIGS / "serve-two-models-h100.yaml")
    assert isinstance(build_app(cfg, cluster_has_gpus=True), Application)


def test_engine_yaml_is_accepted_as_a_one_model_app(tmp_path):
    path = tmp_path / "engine.yaml"
    path.write_text("name: mine\nsource: embedded:tiny-sd\n")
    assert load_serving_config(path).model_names == ["mine"]


def test_cli_dry_run_prints_options_without_ray():
    code = ("import json, sys; from sdserve.cli import main; rc = main(['serve', 'configs/serve-two-models-h100.yaml',"
            " '--dry-run', '--gpus']); assert 'ray' not in sys.modules, 'ray imported'; "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=CONFIGS.parent,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    opts = json.loads(out.stdout)
    assert opts["model-sdxl"]["ray_actor_options"]["num_gpus"] == 0.5


def test_cli_reports_bad_config_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  - deployment: {num_gpus: -1}\n")
    out = subprocess.run([sys.executable, "-m", "sdserve", "serve", str(path), "--dry-run"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "models.0.deployment.num_gpus" in out.stderr


# ---------------------------------------------------------------- security config
def test_env_keys_are_added(monkeypatch):
    monkeypatch.setenv("SDSERVE_API_KEYS", "e1, e2")
    cfg = ServingConfig.model_validate({"security": {"api_keys": ["c1"]}})
    assert cfg.security.effective_api_keys() == ["c1", "e1", "e2"]


def test_openai_request_translation():
    req = to_generation_request(OpenAIImageRequest(prompt="p", n=2, size="128x64", seed=3, quality="hd"))
    assert (req.width, req.height, req.num_images, req.seed) == (128, 64, 2, 3)
    assert parse_size("auto") == (None, None)
    for bad, param in [("big", "size"), ("100x64", "size")]:
        with pytest.raises(OpenAIError) as err:
            to_generation_request(OpenAIImageRequest(prompt="p", size=bad))
        assert err.value.param == param and err.value.status == 400


def test_importing_serving_config_does_not_import_torch_or_ray():
    code = "import sys, serving.config, serving.openai_api, serving.security; " \
           "print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_image_inputs_config_defaults_refuse_uris_and_prefixes_are_checked():
    from core.image_inputs import UriPolicy

    cfg = ServingConfig()
    assert cfg.image_inputs.uri_allowlist.prefixes == [] and cfg.image_inputs.uri_policy() == UriPolicy()
    cfg = ServingConfig.model_validate({"image_inputs": {"uri_allowlist": {"prefixes": ["s3://bucket/in/"]},
                                                         "limits": {"max_bytes": 1 << 20, "min_side": 32}}})
    assert cfg.image_inputs.uri_policy().prefixes == ("s3://bucket/in/",)
    assert cfg.image_inputs.limits.min_side == 32
    for bad in ({"uri_allowlist": {"prefixes": ["s3://bucket"]}}, {"limits": {"max_bytes": 10}},
                {"limits": {"min_side": 512, "max_side": 256}}, {"limits": {"unknown": 1}}):
        with pytest.raises(ValueError):
            ServingConfig.model_validate({"image_inputs": bad})
