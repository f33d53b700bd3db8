"""cluster.yaml validates against Ray's own autoscaler schema and config preparation, offline (no cloud calls)."""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")  # a Ray dependency (validate_config imports it too)

import ray.autoscaler  # noqa: E402
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def cfg() -> dict:
    with open(CLUSTER_YAML, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def schema() -> dict:
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json"), encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def prepared(cfg) -> dict:
    return prepare_config(copy.deepcopy(cfg))


def test_raw_config_matches_ray_schema(cfg, schema):
    jsonschema.validate(cfg, schema)


def test_schema_check_is_strict(cfg, schema):
    """The schema really bites: a misspelled key is rejected (so the test above means something)."""
    bad = copy.deepcopy(cfg)
    bad["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_l4"]["resources"]["GPU"] = 0.5  # resources must be integers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_ray_prepare_and_validate_config(prepared):
    """What `ray up` does before touching the cloud: merge the AWS defaults, then validate."""
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    # setup_commands are merged in front of the per-role commands.
    assert prepared["head_setup_commands"][0] == prepared["setup_commands"][0]
    assert prepared["worker_setup_commands"][0] == prepared["setup_commands"][0]


def test_head_is_cpu_only_and_schedules_no_work(cfg):
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "replicas/actors must not land on the head"
    assert not re.match(r"^(g\d|p\d)", head["node_config"]["InstanceType"]), "head should be a CPU instance"


# InstanceType -> (GPUs, memory per GPU in GB). Checked against the node types below.
GPU_INSTANCES = {"g6.2xlarge": (1, 24), "g5.2xlarge": (1, 24), "g6e.2xlarge": (1, 48),
                 "p4d.24xlarge": (8, 40), "p5.48xlarge": (8, 80)}


def test_gpu_worker_types_cover_sd15_and_sdxl(cfg):
    workers = {name: nt for name, nt in cfg["available_node_types"].items() if name != cfg["head_node_type"]}
    by_mem = {}
    for name, nt in workers.items():
        itype = nt["node_config"]["InstanceType"]
        assert itype in GPU_INSTANCES, f"{name}: unexpected instance type {itype}"
        gpus, mem = GPU_INSTANCES[itype]
        assert nt["resources"]["GPU"] == gpus, f"{name}: GPU count does not match {itype}"
        assert nt["resources"]["CPU"] >= 4 * gpus, f"{name}: too few CPUs per GPU for decode/encode"
        assert 0 <= nt.get("min_workers", 0) <= nt["max_workers"]
        by_mem.setdefault(mem, []).append(name)
    assert any(m == 24 for m in by_mem), "need an SD1.5-class (24 GB) worker type"
    assert any(m >= 40 for m in by_mem), "need an SDXL-class (>= 40 GB) worker type"
    assert {"g6.2xlarge", "g6e.2xlarge"} <= {nt["node_config"]["InstanceType"] for nt in workers.values()}
    assert sum(nt.get("min_workers", 0) for nt in workers.values()) <= cfg["max_workers"]
    assert cfg["idle_timeout_minutes"] > 0


def test_image_matches_installed_ray(cfg):
    """The container's Ray must equal the Ray that runs `ray up` (and that pyproject pins)."""
    ver = ray.__version__
    for key in ("image", "head_image"):
        image = cfg["docker"][key]
        assert image.startswith(f"rayproject/ray:{ver}-py311"), f"docker.{key}={image} vs ray {ver}"
    assert cfg["docker"]["image"].endswith(("-gpu", "-cu121", "-cu124", "-cu128")), "workers need a CUDA image"


def test_project_is_mounted_and_installed(cfg):
    assert cfg["file_mounts"].get("~/sdserve") == "."
    excluded = " ".join(cfg["rsync_exclude"])
    assert ".venv" in excluded and ".git" in excluded, "never ship the venv / git history to every node"
    setup = cfg["head_setup_commands"] + cfg["worker_setup_commands"]
    assert sum("pip install" in c and "-e ~/sdserve" in c for c in setup) == 2, "head and workers install it"


def test_shared_cache_reaches_the_engine(cfg):
    run_options = " ".join(cfg["docker"]["run_options"])
    m = re.search(r"-e SDSERVE_CACHE_DIR=(\S+)", run_options)
    assert m, "containers must get SDSERVE_CACHE_DIR"
    cache_dir = m.group(1)
    mount = re.search(r"-v (\S+):(\S+)", run_options)
    assert mount and cache_dir.startswith(mount.group(2) + "/"), "SDSERVE_CACHE_DIR must live on the shared mount"
    hf = re.search(r"-e HF_HOME=(\S+)", run_options)
    assert hf and hf.group(1).startswith(mount.group(2) + "/"), "hub downloads must be shared too"
    init = " ".join(cfg["initialization_commands"])
    assert mount.group(1) in init and "mount -t nfs4" in init


def test_head_start_uses_autoscaling_config(cfg):
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in cfg["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])
