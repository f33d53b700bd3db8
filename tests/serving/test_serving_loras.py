"""LoRAs through Serve: GET /v1/loras and /sdapi/v1/loras from the model deployment, and multiplexed routing over
two replicas with one logical GPU each (Ray assigns each replica its own GPU id; the engines run on CPU): requests
for a LoRA go to the replica that loaded it (each LoRA is loaded once in the deployment), and a new LoRA goes to
the replica holding the fewest adapter sets (serving/lora_routing.py)."""
from __future__ import annotations

import time

import pytest

from tests.core import lora_files as lf

pytestmark = pytest.mark.integration
KEY = "lora-key"


@pytest.fixture(scope="module")
def lora_app(serve_url, tmp_path_factory):
    from ray import serve

    from core.embedded import build_pipeline
    from serving.builder import build_app
    from serving.config import ServingConfig

    folder = tmp_path_factory.mktemp("served-loras")
    unet = build_pipeline("tiny-sd").unet
    for i, name in enumerate(["ink", "oil", "pencil"]):
        lf.save_kohya(folder / f"{name}.safetensors", {"unet": lf.peft_lora(unet, lf.UNET_ATTENTION, seed=i)},
                      metadata={"modelspec.trigger_phrase": f"{name} style"})
    # num_gpus 1 with device cpu: each replica reserves a whole logical GPU of the session cluster (conftest:
    # 3 GPUs, the main app holds one); the engines still run on CPU.
    config = {"app_name": "loras", "route_prefix": "/loras", "security": {"api_keys": [KEY]},
              "models": [{"engine": {"name": "tiny-lora", "device": "cpu", "loras": {"uri": str(folder)}},
                          "deployment": {"num_replicas": 2, "num_gpus": 1, "num_cpus": 0.25}}]}
    serve.run(build_app(ServingConfig.model_validate(config)), name="loras", route_prefix="/loras")
    yield serve_url + "/loras"
    # its two GPUs go back to the shared cluster for the modules after this one (not waiting: conftest.py)
    serve.delete("loras", _blocking=False)


def replica_reports(handle, tries: int = 40) -> dict[str, dict]:
    """{replica id: its engine's LoRA stats + the adapter sets it reports to Serve + the GPU ids and the GPUs Ray
    reserved for it}, asking until both replicas answered."""
    seen: dict[str, dict] = {}
    for _ in range(tries):
        info = handle.info.remote().result(timeout_s=60)
        seen[info["replica"]] = dict(info["loras"], adapter_sets=info["adapter_sets"], gpu_ids=info["gpu_ids"],
                                     gpus=info["ray_resources"].get("GPU"))
        if len(seen) == 2:
            break
    return seen


def wait_until_routed(handle, set_id: str, timeout_s: float = 60) -> None:
    """Until this handle's router has heard (controller long poll) which replica reports `set_id`. Ray internals:
    when they move, there is nothing to wait for and the test asserts on whatever routing happened."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            table = handle._router._asyncio_router.request_router._multiplexed_model_id_to_replica_ids
        except AttributeError:
            return
        if table.get(set_id):
            return
        time.sleep(0.05)
    raise AssertionError(f"the router never learned where {set_id!r} is held")


def test_lora_lists_over_http(lora_app):
    import httpx

    with httpx.Client(base_url=lora_app, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
        listed = c.get("/v1/loras").json()["loras"]
        assert sorted(e["name"] for e in listed) == ["ink", "oil", "pencil"]
        assert all(e["model"] == "tiny-lora" and e["layout"] == "kohya" and e["rank"] == 4 for e in listed)
        assert {e["name"]: e["trigger_words"] for e in listed}["oil"] == ["oil style"]
        a1111 = c.get("/sdapi/v1/loras").json()
        assert sorted(e["name"] for e in a1111) == ["ink", "oil", "pencil"]
        bad = c.post("/v1/generate", json={"prompt": "a fox", "steps": 1, "loras": [{"name": "nope"}]})
        assert bad.status_code == 422 and "ink, oil, pencil" in bad.text
        assert c.get("/v1/loras", params={"model": "other"}).status_code == 404
        a1111 = c.post("/sdapi/v1/txt2img", json={"prompt": "a fox <lora:nope:0.7>", "steps": 1})
        assert a1111.status_code == 422 and a1111.json()["detail"][0]["loc"] == ["body", "prompt"]


def test_requests_for_a_lora_go_to_the_replica_that_loaded_it(lora_app):
    import httpx
    from ray import serve

    from core.schemas import GenerationRequest
    from serving.config import model_deployment_name
    from serving.lora_routing import adapter_set_id

    handle = serve.get_deployment_handle(model_deployment_name("tiny-lora"), app_name="loras")
    ink = [GenerationRequest(prompt="a fox", steps=1, seed=i, loras=[{"name": "ink", "weight": 0.5 + i / 10}])
           for i in range(6)]
    assert adapter_set_id(ink[0]) == "ink"
    for i, req in enumerate(ink):  # one after the other: each is routed by what the replicas report by then
        handle.options(multiplexed_model_id=adapter_set_id(req)).generate.remote(req).result(timeout_s=120)
        if i == 0:  # the first one went anywhere; its replica's report reaches routers through the controller
            wait_until_routed(handle, "ink")
    with httpx.Client(base_url=lora_app, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
        for i in range(3):  # HTTP: the ingress derives the id from the body (here from the prompt's tag)
            r = c.post("/v1/generate", json={"prompt": f"a fox <lora:ink:0.{i + 3}>", "steps": 1, "seed": i})
            assert r.status_code == 200, r.text
    oil = GenerationRequest(prompt="a cat", steps=1, loras=[{"name": "oil"}])
    handle.options(multiplexed_model_id="oil").generate.remote(oil).result(timeout_s=120)
    reports = replica_reports(handle)
    assert len(reports) == 2
    holders = {rid: set(stats["resident"]) for rid, stats in reports.items()}
    with_ink = [rid for rid, names in holders.items() if "ink" in names]
    assert len(with_ink) == 1  # 9 requests for ink, all on the replica that loaded it
    assert "ink" in reports[with_ink[0]]["adapter_sets"]  # what Serve's router routes by
    assert sum(stats["loads"] for stats in reports.values()) == 2  # ink once, oil once: nothing loaded twice
    (other,) = set(holders) - set(with_ink)
    assert holders[other] == {"oil"}  # a new LoRA goes to the replica with the fewest adapter sets
    # ...and the two replicas routing told apart are on two different logical GPUs, one whole GPU each
    ink_gpus, oil_gpus = reports[with_ink[0]]["gpu_ids"], reports[other]["gpu_ids"]
    assert len(ink_gpus) == 1 and len(oil_gpus) == 1 and ink_gpus != oil_gpus, (ink_gpus, oil_gpus)
    assert reports[with_ink[0]]["gpus"] == reports[other]["gpus"] == 1.0
