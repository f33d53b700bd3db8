"""A1111-compatible routes (/sdapi/v1) on the real Serve app of conftest.py (tiny models on CPU), called the way
A1111 clients call them: txt2img shapes and determinism, model switching, names, progress and interrupt."""
from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.serving.conftest import KEYS

pytestmark = pytest.mark.integration


def test_txt2img_returns_pngs_of_the_requested_size_and_is_deterministic(client):
    body = {"prompt": "a red cube", "negative_prompt": "blur", "seed": 123, "width": 72, "height": 64, "steps": 2,
            "cfg_scale": 6, "sampler_name": "Euler a", "batch_size": 2}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "parameters", "info"} and len(out["images"]) == 2
    for b64 in out["images"]:
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert img.format == "PNG" and img.size == (72, 64)
    info = json.loads(out["info"])  # a JSON string, as A1111 clients expect
    assert (info["seed"], info["all_seeds"], info["sampler_name"], info["steps"], info["cfg_scale"],
            info["width"], info["height"], info["sd_model_name"]) == (123, [123, 124], "Euler a", 2, 6, 72, 64,
                                                                      "tiny-sd")
    assert info["sdserve_scheduler"] == "euler_a" and len(info["infotexts"]) == 2
    assert out["parameters"]["sampler_name"] == "Euler a" and out["parameters"]["seed"] == 123
    again = client.post("/sdapi/v1/txt2img", json=body).json()
    assert again["images"] == out["images"]  # same seed, same bytes
    other = client.post("/sdapi/v1/txt2img", json={**body, "seed": 124, "batch_size": 1}).json()
    assert other["images"][0] == out["images"][1]  # image i of a batch uses seed + i, as A1111 does


def test_random_seed_is_reported(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": -1, "steps": 1})
    info = json.loads(r.json()["info"])
    assert r.status_code == 200 and 0 <= info["seed"] < 2**32 and info["all_seeds"] == [info["seed"]]


def test_names_and_lists(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"Euler a", "Euler", "DPM++ 2M", "UniPC", "DDIM"} <= {s["name"] for s in samplers}
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert [s["label"] for s in client.get("/sdapi/v1/schedulers").json()] == ["Automatic", "Uniform", "Karras"]
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["tiny-sd", "tiny-b"] and models[0]["hash"] is None
    for path, empty in [("loras", []), ("scripts", {"txt2img": [], "img2img": []}), ("sd-vae", []),
                        ("prompt-styles", []), ("embeddings", {"loaded": {}, "skipped": {}})]:
        assert client.get(f"/sdapi/v1/{path}").json() == empty
    assert client.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer wrong"}).status_code == 401
    # HTTP Basic with the key as password (A1111's --api-auth style) works here, a wrong or malformed one does not
    basic = base64.b64encode(f"bot:{KEYS[1]}".encode()).decode()
    assert client.get("/sdapi/v1/samplers", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    for bad in (base64.b64encode(b"bot:wrong").decode(), base64.b64encode(b"no-colon").decode(), "%%%"):
        assert client.get("/sdapi/v1/samplers", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Basic {basic}"}).status_code == 401  # /sdapi only


def test_bad_sampler_and_bounds_are_422_naming_the_a1111_field(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Euler b", "steps": 1})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail[0]["loc"] == ["body", "sampler_name"] and "Euler a" in detail[0]["msg"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 9, "steps": 1})  # max 8 per request
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "batch_size"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 100})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "width"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 401})  # the model's limit (400 here)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "enable_hr"]


def test_options_post_switches_the_model(client):
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd"
    try:
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-b"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-b"
        body = {"prompt": "x", "seed": 5, "steps": 1, "width": 64, "height": 64}
        on_b = client.post("/sdapi/v1/txt2img", json=body).json()
        assert json.loads(on_b["info"])["sd_model_name"] == "tiny-b"
        # the per-request override still wins
        on_a = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint":
                                                                                   "tiny-sd"}}).json()
        assert json.loads(on_a["info"])["sd_model_name"] == "tiny-sd" and on_a["images"] != on_b["images"]
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl-base"})
        assert r.status_code == 422 and "tiny-sd, tiny-b" in r.json()["detail"][0]["msg"]
        r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "CLIP_stop_at_last_layers"]
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-b"  # refusals changed nothing
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd"})


def test_progress_while_running_and_interrupt_cancels_it(client, serve_url):
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["state"]["job_count"] == 0 and idle["progress"] == 0 and idle["current_image"] is None
    slow = {"prompt": "slow", "seed": 3, "steps": 400, "width": 512, "height": 512}  # tens of seconds on CPU

    def run_slow() -> httpx.Response:
        with httpx.Client(base_url=serve_url, timeout=300, headers={"Authorization": f"Bearer {KEYS[0]}"}) as c:
            return c.post("/sdapi/v1/txt2img", json=slow)

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(run_slow)
        deadline = time.monotonic() + 240
        while True:  # wait for the first live preview (every 5 steps; A1111 clients poll progress like this)
            p = client.get("/sdapi/v1/progress").json()
            if p["current_image"] is not None or pending.done():
                break
            assert time.monotonic() < deadline, "no preview reported"
            time.sleep(0.05)  # poll interval, not a stand-in for the event: the loop waits for the condition
        assert not pending.done(), pending.result().text
        state = p["state"]
        assert (state["job"], state["job_count"], state["sampling_steps"], state["interrupted"]) == \
            ("txt2img", 1, 400, False)
        assert 0 < p["progress"] < 1 and p["eta_relative"] >= 0 and state["sampling_step"] >= 5
        preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
        assert preview.format == "JPEG" and preview.size == (64, 64)  # latent2rgb: the 512x512 image's latents
        assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] \
            is None
        assert client.post("/sdapi/v1/interrupt").json() == {}
        r = pending.result(timeout=120)
    assert r.status_code == 409 and "interrupted at step" in r.json()["detail"]
    step = int(r.json()["detail"].split("step ")[1].split("/")[0])
    assert 1 <= step < 400
    after = client.get("/sdapi/v1/progress").json()
    assert after["state"]["job_count"] == 0 and after["state"]["interrupted"] is True
    # the replica is free again: a new request runs (it would queue behind the slow one if that still ran)
    ok = client.post("/sdapi/v1/txt2img", json={"prompt": "after", "steps": 1})
    assert ok.status_code == 200 and client.get("/sdapi/v1/progress").json()["state"]["interrupted"] is False


def test_webuiapi_client_works_unmodified(serve_url):
    """The most used A1111 client library, as its README uses it; its HTTP Basic auth carries the API key."""
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(baseurl=f"{serve_url}/sdapi/v1", sampler="DPM++ 2M", scheduler="Karras", steps=2)
    api.set_auth("any-user", KEYS[0])
    res = api.txt2img(prompt="a cat", negative_prompt="dog", seed=7, width=64, height=80, batch_size=2, cfg_scale=5)
    assert [im.size for im in res.images] == [(64, 80), (64, 80)]
    assert res.info["all_seeds"] == [7, 8] and res.info["sampler_name"] == "DPM++ 2M"
    assert res.info["sdserve_scheduler"] == "dpmpp_2m_karras"
    assert "eta" in res.info["sdserve_ignored"]  # webuiapi sends eta=1.0: accepted, reported, not applied
    assert res.parameters["prompt"] == "a cat"
    assert {"Euler a", "DPM++ 2M"} <= set(api.util_get_sampler_names())
    assert api.util_get_scheduler_names() == ["automatic", "karras", "uniform"]
    assert api.util_get_model_names() == ["tiny-b", "tiny-sd"]
    try:
        api.util_set_model("tiny-b")
        assert api.util_get_current_model() == "tiny-b"
        assert api.txt2img(prompt="a cat", seed=7, width=64, height=64).info["sd_model_name"] == "tiny-b"
    finally:
        api.util_set_model("tiny-sd")
    assert api.get_progress()["state"]["job_count"] == 0 and api.interrupt() == {}
    assert api.get_loras() == []


def test_webuiapi_img2img_and_inpainting_unmodified(serve_url):
    """webuiapi's img2img sends every A1111 field with its default (inpaint_full_res true, image_cfg_scale...)."""
    webuiapi = pytest.importorskip("webuiapi")
    from PIL import Image

    api = webuiapi.WebUIApi(baseurl=f"{serve_url}/sdapi/v1", sampler="Euler a", steps=4)
    api.set_auth("any-user", KEYS[0])
    init = Image.new("RGB", (96, 64), (30, 140, 90))
    res = api.img2img(images=[init], prompt="a frog", seed=3, width=96, height=64, denoising_strength=0.5)
    assert [im.size for im in res.images] == [(96, 64)] and res.info["denoising_strength"] == 0.5
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (48, 0, 96, 64))
    res = api.img2img(images=[init], mask_image=mask, prompt="a frog", seed=3, width=96, height=64,
                      inpainting_fill=1, mask_blur=0, denoising_strength=1.0)
    kept = res.images[0].crop((0, 0, 40, 64)).tobytes()
    assert kept == init.crop((0, 0, 40, 64)).tobytes()  # outside the mask: the init image's pixels
    assert "inpaint_full_res" in res.info["sdserve_ignored"]
