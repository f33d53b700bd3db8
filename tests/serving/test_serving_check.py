"""`sdserve check` and the deploy file: typos are clear errors before deploying; the deploy file is `make serve`'s
app; resource demands name the config keys; deploy failures shrink to the ModelLoadError line."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.preflight import check_resources, ResourceError
from serving.app import config_from_args
from serving.check import check_config_file
from serving.cli import one_line, serving_demands
from serving.config import load_serving_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_deploy_file_is_make_serves_app():
    deploy = yaml.safe_load((CONFIGS / "serve-deploy.yaml").read_text())
    (app,) = deploy["applications"]
    assert app["name"] == "sdserve" and deploy["http_options"]["host"] == "127.0.0.1"
    assert config_from_args(app["args"]) == load_serving_config(CONFIGS / "serve-default.yaml")


@pytest.mark.parametrize("name", ["serve-deploy.yaml", "serve-default.yaml", "serve-two-models-h100.yaml"])
def test_shipped_configs_pass_the_check(name):
    lines = check_config_file(str(CONFIGS / name), check_sources=False)
    assert lines and all(": ok: " in ln for ln in lines)


def edited_deploy(tmp_path, edit) -> str:
    data = yaml.safe_load((CONFIGS / "serve-deploy.yaml").read_text())
    edit(data)
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["applications"][0]["args"]["models"][0]["deployment"].update(num_gpu=1),
     "applications[0].args.models.0.deployment.num_gpu: Extra inputs are not permitted"),
    (lambda d: d.update(applicatons=d.pop("applications")), "unknown top-level key(s) applicatons"),
    (lambda d: d["applications"][0].update(name="other"), "applications[0].name is 'other'"),
    (lambda d: d["applications"][0]["args"]["models"][0]["engine"].update(source="/nope/sd15"),
     "local path /nope/sd15 does not exist"),
])
def test_typos_are_clear_errors(tmp_path, edit, words):
    with pytest.raises(ValueError) as err:
        check_config_file(edited_deploy(tmp_path, edit))
    assert words in str(err.value) and "deploy.yaml" in str(err.value)


def test_cli_check_exit_codes(tmp_path, capsys):
    from sdserve.cli import main

    assert main(["check", str(CONFIGS / "serve-deploy.yaml")]) == 0
    bad = edited_deploy(tmp_path, lambda d: d["applications"][0]["args"].update(modles=[]))
    assert main(["check", bad]) == 2
    assert "applications[0].args.modles" in capsys.readouterr().err


def test_two_model_config_on_a_cpu_cluster_names_the_keys():
    config = load_serving_config(CONFIGS / "serve-two-models-h100.yaml")
    with pytest.raises(ResourceError) as err:
        check_resources(serving_demands(config, cluster_has_gpus=False), {"CPU": 16.0})
    text = str(err.value)
    assert "needs 0.75 GPU" in text and "models[0].deployment.num_gpus" in text and "CPU" not in text.split(":")[0]


def test_default_config_fits_a_two_cpu_box():
    check_resources(serving_demands(load_serving_config(None), cluster_has_gpus=False), {"CPU": 2.0})


def test_deploy_failure_shrinks_to_the_load_error_line():
    details = ("Traceback (most recent call last):\n  File x\ncore.loading.ModelLoadError: model 'a' (source 'o/m'): "
               "the hub could not be reached\n")
    err = RuntimeError("Deploying application sdserve failed: Failed to update the deployments ['model-a'].")
    assert one_line(err, details) == "model 'a' (source 'o/m'): the hub could not be reached"


def test_added_latency_inside_noise_is_not_reported():
    from serving.bench import added_latency

    assert added_latency(0.100, 0.110, 0.02)["added_latency_ms"] is None
    assert "not meaningful" in added_latency(0.100, 0.095, 0.02)["added_latency_note"]
    assert added_latency(0.150, 0.100, 0.01)["added_latency_ms"] == pytest.approx(50.0)
