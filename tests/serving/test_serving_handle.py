"""Calling model deployments from other Ray code through a DeploymentHandle, and fractional GPU placement."""
from __future__ import annotations

import httpx
import pytest

from core.schemas import GenerationError, GenerationRequest, GenerationResult
from tests.serving.conftest import KEYS

pytestmark = pytest.mark.integration


def test_handle_from_a_ray_task_gives_the_same_bytes_as_http(serve_url, ray_cluster):
    import ray

    @ray.remote(num_cpus=0)
    def call(req: GenerationRequest) -> GenerationResult:
        from ray import serve

        handle = serve.get_deployment_handle("model-tiny-sd", app_name="sdserve")
        return handle.generate.remote(req).result()

    req = GenerationRequest(prompt="handle call", seed=1234, num_images=1)
    result = ray.get(call.remote(req))
    assert isinstance(result, GenerationResult) and result.seed == 1234 and result.model == "tiny-sd"
    http = httpx.post(f"{serve_url}/v1/generate", json=req.model_dump(exclude_none=True),
                      headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=60)
    assert http.content == result.images[0].data


def test_handle_from_an_actor_and_errors_raise_generation_error(serve_url, ray_cluster):
    import ray

    @ray.remote(num_cpus=0)
    class Client:
        def __init__(self):
            from ray import serve

            self.handle = serve.get_deployment_handle("model-tiny-b", app_name="sdserve")

        async def run(self, req: GenerationRequest):
            try:
                return await self.handle.generate.remote(req)
            except GenerationError as err:  # the replica's GenerationError arrives as that type
                return ("error", err.kind, err.field, err.message)

    actor = Client.remote()
    ok = ray.get(actor.run.remote(GenerationRequest(prompt="x", seed=5, num_images=2)))
    assert [i.seed for i in ok.images] == [5, 6] and ok.model == "tiny-b"
    err = ray.get(actor.run.remote(GenerationRequest(prompt="x", steps=500)))
    assert err[:3] == ("error", "validation", "steps")


def test_two_models_share_one_logical_gpu_at_half_each(serve_url, ray_cluster):
    import ray
    from ray import serve

    infos = [serve.get_deployment_handle(f"model-{m}", app_name="sdserve").info.remote().result()
             for m in ("tiny-sd", "tiny-b")]
    assert [i["gpu_ids"] for i in infos] == [["0"], ["0"]]  # both on the one (logical) GPU
    assert [i["gpu_fraction"] for i in infos] == [0.5, 0.5]  # VRAM budget = 0.5 x total on CUDA
    assert all(i["device"] == "cpu" for i in infos)  # logical GPUs: the engines run on CPU
    # What Ray reserved for each replica (other apps on the shared cluster hold GPUs of their own): 0.5 + 0.5,
    # both on GPU 0, so the two replicas fill exactly that one GPU.
    assert [i["ray_resources"].get("GPU") for i in infos] == [0.5, 0.5]
    reserved = ray.cluster_resources()["GPU"] - ray.available_resources().get("GPU", 0)
    assert reserved >= 1.0  # and the cluster counts them as taken
