"""KubeRay manifests in deploy/kuberay/: they parse, their top-level structure matches the ray.io/v1 CRD fields
they use, the embedded Serve config validates with Ray's own ServeDeploySchema (and its `args` with the serving
app's ServingConfig), the cluster specs go through Ray's own KubeRay autoscaling-config derivation, and the
RayJob's entrypoint parses with the real `sdserve` CLI. No cluster, no network."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

import ray
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.serve.schema import (DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema, ServeApplicationSchema,
                              ServeDeploySchema)

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"

# The ray.io/v1 fields these manifests may use (KubeRay v1.1+; rayservice_types.go / rayjob_types.go /
# raycluster_types.go). A hand-written subset, not the CRD: a typo in a key is caught, a new feature is added here.
RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serveService",
                   "excludeHeadPodFromServeSvc", "rayClusterDeletionDelaySeconds"}
RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "submissionMode", "shutdownAfterJobFinishes",
               "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit", "jobId", "metadata",
               "clusterSelector", "submitterPodTemplate", "submitterConfig", "entrypointNumCpus",
               "entrypointNumGpus", "entrypointResources", "suspend", "deletionStrategy", "managedBy"}
CLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
                "scaleStrategy", "idleTimeoutSeconds", "suspend"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
                      "idleTimeoutSeconds", "upscalingMode", "version"}
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                out.append((path.name, doc))
    return out


def _of_kind(kind: str) -> list[dict]:
    found = [d for _, d in _docs() if d.get("kind") == kind]
    assert found, f"no {kind} manifest in {KUBERAY}"
    return found


def _cluster_specs() -> list[tuple[str, dict]]:
    return ([(d["metadata"]["name"], d["spec"]["rayClusterConfig"]) for d in _of_kind("RayService")]
            + [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in _of_kind("RayJob")])


def _serve_configs() -> list[dict]:
    return [yaml.safe_load(d["spec"]["serveConfigV2"]) for d in _of_kind("RayService")]


def _pod_spec(group: dict) -> dict:
    return group["template"]["spec"]


def _ray_container(group: dict) -> dict:
    return _pod_spec(group)["containers"][0]  # KubeRay: the Ray container is the first one


def test_every_manifest_parses_with_kind_and_name():
    docs = _docs()
    assert {d["kind"] for _, d in docs} >= {"RayService", "RayJob", "PersistentVolumeClaim"}
    for name, doc in docs:
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, name
        assert DNS1123.match(doc["metadata"]["name"]), f"{name}: metadata.name must be DNS-1123"
        if doc["kind"] in ("RayService", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", name


def test_rayservice_spec_fields():
    for svc in _of_kind("RayService"):
        spec = svc["spec"]
        assert set(spec) <= RAYSERVICE_SPEC, set(spec) - RAYSERVICE_SPEC
        assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML multi-line *string*"


def test_rayjob_spec_fields():
    for job in _of_kind("RayJob"):
        spec = job["spec"]
        assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
        assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode")
        assert isinstance(spec.get("runtimeEnvYAML", ""), str)
        assert isinstance(yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"), dict)
        assert spec["shutdownAfterJobFinishes"] is True, "GPU clusters must not outlive the job"
        assert spec.get("backoffLimit", 0) >= 1, "the job is resumable: let KubeRay retry it"


@pytest.mark.parametrize("name,cluster", _cluster_specs(), ids=[n for n, _ in _cluster_specs()])
def test_cluster_spec_structure(name, cluster):
    assert set(cluster) <= CLUSTER_SPEC, set(cluster) - CLUSTER_SPEC
    assert cluster["rayVersion"] == ray.__version__, "the image's Ray must match rayVersion"
    assert set(cluster.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_GROUP
    groups = cluster["workerGroupSpecs"]
    assert groups
    for g in [head, *groups]:
        # rayStartParams is map[string]string in the CRD: an unquoted number is rejected by the API server.
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
        c = _ray_container(g)
        assert c["image"] == _ray_container(head)["image"], "one image for head and workers"
    for g in groups:
        assert set(g) <= WORKER_GROUP, set(g) - WORKER_GROUP
        assert DNS1123.match(g["groupName"])
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        limits = _ray_container(g)["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{g['groupName']}: a GPU worker group"


@pytest.mark.parametrize("name,cluster", _cluster_specs(), ids=[n for n, _ in _cluster_specs()])
def test_ray_derives_a_valid_autoscaling_config(name, cluster):
    """What the KubeRay autoscaler itself computes from the CR (and validates with ray-schema.json)."""
    auto = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": name, "namespace": "default"},
                                                  "spec": cluster})
    types = auto["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0, "head must not take replicas/actors"
    assert "GPU" not in types["headgroup"]["resources"]
    for group in cluster["workerGroupSpecs"]:
        assert types[group["groupName"]]["resources"]["GPU"] >= 1


@pytest.mark.parametrize("name,cluster", _cluster_specs(), ids=[n for n, _ in _cluster_specs()])
def test_shared_model_cache_on_every_pod(name, cluster):
    pvcs = {d["metadata"]["name"]: d for d in _of_kind("PersistentVolumeClaim")}
    for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        c = _ray_container(g)
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("SDSERVE_CACHE_DIR") == "/models"
        assert env.get("HF_HOME", "").startswith("/models/")
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in _pod_spec(g)["volumes"]}
        claim = vols[mounts["/models"]]["persistentVolumeClaim"]["claimName"]
        assert claim in pvcs, f"PVC {claim} has no manifest"
        assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"], "replicas on many nodes share it"
        assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", "Ray's object store needs /dev/shm"


def _check_keys(data: dict, model, where: str) -> None:
    unknown = set(data) - set(model.model_fields)
    assert not unknown, f"{where}: unknown keys {unknown} (Ray would silently ignore them)"


def test_serve_config_validates_with_ray_schema():
    for cfg in _serve_configs():
        ServeDeploySchema.model_validate(cfg)
        # The schema ignores unknown keys; a misspelled option must not go unnoticed.
        _check_keys(cfg, ServeDeploySchema, "serveConfigV2")
        _check_keys(cfg.get("http_options", {}), HTTPOptionsSchema, "http_options")
        assert cfg["http_options"]["host"] == "0.0.0.0", "the proxy must listen on the pod IP"
        for app in cfg["applications"]:
            _check_keys(app, ServeApplicationSchema, f"applications[{app['name']}]")
            for dep in app.get("deployments", []):
                _check_keys(dep, DeploymentSchema, f"deployment {dep['name']}")
                _check_keys(dep.get("ray_actor_options", {}), RayActorOptionsSchema, f"{dep['name']}.ray_actor_options")


def test_serve_app_args_are_a_valid_serving_config():
    app_mod = importlib.import_module("serving.app")  # a broken module fails here, loudly
    from serving.builder import deployment_options

    for cfg in _serve_configs():
        for app in cfg["applications"]:
            module, _, attr = app["import_path"].partition(":")
            assert module == app_mod.__name__ and callable(getattr(app_mod, attr)), app["import_path"]
            serving_cfg = app_mod.config_from_args(app.get("args", {}))
            assert serving_cfg.app_name == app["name"]
            assert serving_cfg.route_prefix == app["route_prefix"]
            opts = deployment_options(serving_cfg, cluster_has_gpus=True)
            for dep in app.get("deployments", []):
                assert dep["name"] in opts, f"override for unknown deployment {dep['name']} (have {sorted(opts)})"
                # Serve *replaces* the code's ray_actor_options with the override: CPU/GPU must agree with args,
                # or the replica's VRAM budget (its GPU fraction) and its Ray reservation diverge.
                override = dep.get("ray_actor_options")
                if override is not None:
                    built = opts[dep["name"]]["ray_actor_options"]
                    for key in ("num_cpus", "num_gpus"):
                        assert float(override.get(key, 0)) == float(built[key]), (dep["name"], key)


def test_pinned_resources_exist_in_a_worker_group():
    svc = _of_kind("RayService")[0]
    cluster = svc["spec"]["rayClusterConfig"]
    auto = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "x", "namespace": "default"},
                                                  "spec": cluster})
    for cfg in _serve_configs():
        for app in cfg["applications"]:
            for dep in app.get("deployments", []):
                actor = dep.get("ray_actor_options", {})
                need = {**actor.get("resources", {}), "GPU": actor.get("num_gpus", 0), "CPU": actor.get("num_cpus", 1)}
                fits = [name for name, t in auto["available_node_types"].items()
                        if all(t["resources"].get(k, 0) >= v for k, v in need.items())]
                assert fits, f"{dep['name']}: no worker group can host a replica needing {need}"


def test_rayjob_entrypoint_is_a_valid_sdserve_batch_command():
    for job in _of_kind("RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:2] == ["sdserve", "batch"]
        uris = [a for a in argv if "://" in a]
        assert len(uris) >= 2 and all(u.startswith(("s3://", "gs://", "abfs://")) for u in uris[:2]), \
            "input and output Parquet live in object storage"
        from sdserve.cli import build_parser

        parser = build_parser()
        sub = next(a for a in parser._actions if a.dest == "command")
        assert "batch" in sub.choices, "`sdserve batch` is not registered (batch_jobs.cli failed to import?)"
        args = parser.parse_args(argv[1:])
        assert args.command == "batch"
