"""Image inputs on the live app (issue 19): the shared "sdserve" Serve app of tests/serving/conftest.py (tiny-sd,
real Ray + Serve, no new app). JSON and multipart bodies give the same image, a multipart job round-trips through
the jobs store, the OpenAI client's edits and A1111's img2img run the same engine path as the native route.

Parsing, validation and every bad-image case are unit-tested without Ray in test_image_uploads.py.
"""
from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from tests.serving.conftest import KEYS
from tests.serving.image_samples import b64, half_mask, png
from tests.serving.test_serving_jobs import wait_for

pytestmark = pytest.mark.integration
INIT = png(96, 64, seed=11)  # not the model's default size: the output must follow it
BASE = {"prompt": "a red fox", "steps": 4, "strength": 0.5, "seed": 21}


def _size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_json_and_multipart_give_the_same_image_at_the_init_images_size(client):
    r = client.post("/v1/generate", json={**BASE, "init_image": b64(INIT)})
    assert r.status_code == 200, r.text
    assert _size(r.content) == (96, 64) and (r.headers["x-width"], r.headers["x-height"]) == ("96", "64")
    m = client.post("/v1/generate", data={"request": json.dumps(BASE)},
                    files={"init_image": ("fox.png", INIT, "image/png")})
    assert m.status_code == 200, m.text
    assert m.content == r.content
    other = client.post("/v1/generate", json={**BASE, "strength": 0.9, "init_image": b64(INIT)})
    assert other.status_code == 200 and other.content != r.content


def test_inpainting_keeps_the_pixels_outside_the_mask(client):
    import numpy as np

    r = client.post("/v1/generate", data={"request": json.dumps({**BASE, "strength": 1.0, "mask_blur": 0})},
                    files={"init_image": ("a.png", INIT), "mask_image": ("m.png", half_mask(96, 64))})
    assert r.status_code == 200, r.text
    out, init = np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(Image.open(io.BytesIO(INIT)))
    assert (out[:, :40] == init[:, :40]).all()  # the kept (black) half, away from the seam


def test_bad_image_is_a_422_naming_the_field_before_any_model_call(client):
    r = client.post("/v1/generate", json={**BASE, "init_image": b64(png(1, 1))})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "init_image"]
    r = client.post("/v1/jobs", data={"request": json.dumps(BASE)}, files={"init_image": ("a.gif", b"GIF89a....")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "init_image"]


def test_multipart_job_round_trip_equals_the_sync_result(client):
    sync = client.post("/v1/generate", json={**BASE, "init_image": b64(INIT)})
    r = client.post("/v1/jobs", data={"request": json.dumps(BASE)}, files={"init_image": ("fox.png", INIT)})
    assert r.status_code == 202, r.text
    job = wait_for(client, r.json()["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job
    result = client.get(f"/v1/jobs/{job['id']}/result").json()
    assert base64.b64decode(result["images"][0]["b64_json"]) == sync.content


def test_unmodified_openai_client_edits_live(serve_url, client):
    import openai

    oai = openai.OpenAI(base_url=f"{serve_url}/v1", api_key=KEYS[0], max_retries=0, timeout=120)
    out = oai.images.edit(image=("fox.png", INIT, "image/png"), prompt="a red fox",
                          extra_body={"steps": 4, "seed": 21, "strength": 0.5})
    assert len(out.data) == 1 and out.size == "96x64"
    native = client.post("/v1/generate", json={**BASE, "init_image": b64(INIT)})
    assert base64.b64decode(out.data[0].b64_json) == native.content  # the same engine path
    two = oai.images.edit(image=("fox.png", INIT, "image/png"), prompt="a red fox", n=2, size="64x64",
                          extra_body={"steps": 4})
    assert len(two.data) == 2 and two.size == "64x64"
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.edit(image=("fox.png", INIT), mask=("m.png", png(96, 64)), prompt="a fox")  # mask w/o alpha
    assert err.value.body["param"] == "mask"


def test_a1111_img2img_live_matches_the_native_route(client):
    native = client.post("/v1/generate", json={**BASE, "init_image": b64(INIT), "scheduler": "euler_a"})
    r = client.post("/sdapi/v1/img2img", json={"prompt": "a red fox", "steps": 4, "seed": 21,
                                               "denoising_strength": 0.5, "sampler_name": "Euler a",
                                               "init_images": [b64(INIT)]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert base64.b64decode(out["images"][0]) == native.content
    info = json.loads(out["info"])
    assert (info["width"], info["height"], info["denoising_strength"]) == (96, 64, 0.5)


def test_controlnets_are_listed_from_the_deployment_and_steer_the_image(client):
    listed = client.get("/v1/controlnets").json()["data"]
    assert [(c["id"], c["model"], c["family"]) for c in listed] == [("tiny-pose", "tiny-b", "sd15")]
    assert client.get("/controlnet/model_list").json() == {"model_list": ["tiny-pose"]}
    pose = b64(png(64, 64, seed=5))
    plain = {"prompt": "a dancer", "steps": 4, "seed": 2, "model": "tiny-b"}
    without = client.post("/v1/generate", json=plain)
    steered = client.post("/v1/generate", data={"request": json.dumps({**plain, "control": [
        {"model": "tiny-pose", "scale": 2.0}]})}, files={"control.0.image": ("pose.png", png(64, 64, seed=5))})
    assert without.status_code == steered.status_code == 200, steered.text
    assert steered.content != without.content
    r = client.post("/v1/generate", json={**plain, "control": [{"model": "nope", "image": pose}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "control"]
    a1111 = client.post("/sdapi/v1/txt2img", json={
        "prompt": "a dancer", "steps": 4, "seed": 2, "override_settings": {"sd_model_checkpoint": "tiny-b"},
        "alwayson_scripts": {"controlnet": {"args": [{"image": pose, "model": "tiny-pose [0000]", "weight": 2.0,
                                                      "module": "none"}]}}})
    assert a1111.status_code == 200, a1111.text
    assert "ControlNet 0" in json.loads(a1111.json()["info"])["extra_generation_params"]
