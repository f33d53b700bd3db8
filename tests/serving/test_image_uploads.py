"""Image inputs on the HTTP layer without Ray (issue 19): JSON and multipart bodies of the native routes, the
per-route body limit, and every bad image refused in the ingress (before the model is called) naming its field.

The app is the real one (serving.http.app.create_app) around a stand-in ingress whose model call records what it
was given; the live routes are exercised in test_image_routes.py.
"""
from __future__ import annotations

import asyncio
import json
import types

import pytest
from fastapi.testclient import TestClient

from core.schemas import GeneratedImage, GenerationResult
from serving.config import ServingConfig
from tests.serving.image_samples import alpha_mask, b64, bad_images, half_mask, png

pytestmark = []


class RecordingIngress(types.SimpleNamespace):
    """The parts of serving.ingress.Ingress the routes use; call_model records the request and answers one PNG."""

    def __init__(self, config: dict):
        from serving.drain import DrainGate
        from serving.security import ApiKeys, FailureThrottle

        cfg = ServingConfig.model_validate(config)
        super().__init__(config=cfg, jobs=None, gate=DrainGate(), keys=ApiKeys([]), limiter=None,
                         read_limiter=None, auth_throttle=FailureThrottle(100, 60), calls=[], started=0)

    def check_request(self, req, openai):
        return req.model or self.config.default_model

    async def stream_model(self, name, req, on_progress, on_preview=None):
        return await self.call_model(name, req, False)

    async def call_model(self, name, req, openai):
        self.calls.append(req)
        return GenerationResult(images=[GeneratedImage(data=png(), seed=req.seed or 1, media_type="image/png")],
                                width=64, height=64, steps=1, guidance_scale=1.0, scheduler="euler", model=name,
                                output_format="png", batch_size=1)


def make_client(config: dict | None = None) -> tuple[TestClient, RecordingIngress]:
    from serving.http.app import create_app

    ingress = RecordingIngress(config or {"security": {"max_body_bytes": 2048},
                                          "image_inputs": {"max_body_bytes": 1024 * 1024}})
    return TestClient(create_app(ingress)), ingress


@pytest.fixture(scope="module")
def app():
    return make_client()


def test_json_body_with_base64_and_data_url_images(app):
    client, ingress = app
    img = png()
    r = client.post("/v1/generate", json={"prompt": "a", "init_image": b64(img), "strength": 0.5,
                                          "mask_image": "data:image/png;base64," + b64(half_mask())})
    assert r.status_code == 200, r.text
    req = ingress.calls[-1]
    assert req.init_image == b64(img) and req.strength == 0.5 and req.mask_image.startswith("data:image/png")


def test_multipart_body_fills_image_fields_from_files(app):
    client, ingress = app
    img, mask, pose = png(seed=1), half_mask(), png(seed=2)
    request = {"prompt": "a fox", "strength": 0.6, "mask_blur": 2, "control": [{"model": "pose", "scale": 0.5}]}
    r = client.post("/v1/generate", data={"request": json.dumps(request)},
                    files={"init_image": ("a.png", img, "image/png"), "mask_image": ("m.png", mask, "image/png"),
                           "control.0.image": ("p.png", pose, "image/png")})
    assert r.status_code == 200, r.text
    req = ingress.calls[-1]
    assert (req.init_image, req.mask_image, req.control[0].image) == (img, mask, pose)
    assert (req.prompt, req.strength, req.mask_blur, req.control[0].scale) == ("a fox", 0.6, 2, 0.5)


@pytest.mark.parametrize("data,files,loc", [
    ({"request": json.dumps({"prompt": "a", "init_image": "x"})}, {"init_image": ("a.png", b"x")}, "init_image"),
    ({"request": json.dumps({"prompt": "a"})}, {"control.0.image": ("a.png", b"x")}, "control.0.image"),
    ({"request": json.dumps({"prompt": "a"})}, {"picture": ("a.png", b"x")}, "picture"),
    ({}, {"init_image": ("a.png", b"x")}, "request"),
    ({"request": "{not json"}, {"init_image": ("a.png", b"x")}, "request"),
])
def test_multipart_mistakes_name_the_part(app, data, files, loc):
    client, ingress = app
    before = len(ingress.calls)
    r = client.post("/v1/generate", data=data, files=files)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", loc]
    assert len(ingress.calls) == before


def test_multipart_request_fields_are_validated_like_json(app):
    client, _ = app
    r = client.post("/v1/generate", data={"request": json.dumps({"prompt": "a", "steps": 0})},
                    files={"init_image": ("a.png", png())})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]
    r = client.post("/v1/generate", data={"request": json.dumps({"prompt": "a", "strength": 0.5})},
                    files={"mask_image": ("a.png", png())})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "strength"]  # needs init_image


@pytest.mark.parametrize("case", sorted(bad_images()))
@pytest.mark.parametrize("where", ["init_image", "mask_image", "control.0.image"])
def test_every_bad_image_is_a_422_naming_its_field_before_the_model(app, case, where):
    client, ingress = app
    bad = bad_images()[case]
    body = {"prompt": "a", "init_image": b64(png())}
    if where == "control.0.image":
        body["control"] = [{"model": "pose", "image": bad if isinstance(bad, str) else b64(bad)}]
    else:
        body[where] = bad if isinstance(bad, str) else b64(bad)
    before = len(ingress.calls)
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", *(int(p) if p.isdigit() else p for p in where.split("."))]
    assert where in detail["msg"]
    assert len(ingress.calls) == before  # refused in the ingress: the model never saw it


def test_wrong_size_mask_and_uri_without_allowlist_name_the_field(app):
    client, _ = app
    r = client.post("/v1/generate", json={"prompt": "a", "init_image": b64(png(64, 64)),
                                          "mask_image": b64(half_mask(96, 64))})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "mask_image"]
    assert "same size" in r.json()["detail"][0]["msg"]
    r = client.post("/v1/generate", json={"prompt": "a", "init_image": "file:///etc/passwd"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "init_image"]
    assert "image_inputs.uri_allowlist" in r.json()["detail"][0]["msg"]


def test_uri_inputs_under_the_allowlist_only(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png())
    (tmp_path / "other.png").write_bytes(png())
    client, ingress = make_client({"image_inputs": {"uri_allowlist": {"prefixes": [f"file://{tmp_path}/in/"]}}})
    r = client.post("/v1/generate", json={"prompt": "a", "init_image": f"file://{tmp_path}/in/a.png"})
    assert r.status_code == 200, r.text
    assert ingress.calls[-1].init_image == png()  # read once in the ingress: the model gets the bytes
    r = client.post("/v1/generate", json={"prompt": "a", "init_image": f"file://{tmp_path}/other.png"})
    assert r.status_code == 422 and "not under an allowed prefix" in r.json()["detail"][0]["msg"]
    r = client.post("/v1/generate", json={"prompt": "a", "init_image": f"file://{tmp_path}/in/../other.png"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "init_image"]


def test_image_routes_have_the_larger_body_limit(app):
    client, _ = app
    big = {"prompt": "a", "init_image": b64(png(256, 256))}  # ~260 KB: over 2048, under 1 MiB
    assert len(json.dumps(big)) > 100_000
    assert client.post("/v1/generate", json=big).status_code == 200
    r = client.post("/v1/images/generations", json={"prompt": "x" * 5000})
    assert r.status_code == 413 and "security.max_body_bytes" in r.json()["error"]["message"]
    r = client.post("/v1/generate", json={"prompt": "a", "init_image": "A" * (2 * 1024 * 1024)})
    assert r.status_code == 413 and "image_inputs.max_body_bytes" in r.json()["detail"]["message"]


def test_plain_json_errors_keep_their_shape(app):
    client, _ = app
    r = client.post("/v1/generate", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"]["code"] == "invalid_json"
    r = client.post("/v1/generate", content=b'{"prompt": "a"}', headers={"content-type": "text/plain"})
    assert r.status_code == 422
    r = client.post("/v1/generate", json={"prompt": "a", "bogus": 1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "bogus"]


def test_takes_images_matches_routes_under_a_prefix():
    from serving.http.uploads import takes_images

    assert takes_images("POST", "/sd/v1/generate") and takes_images("POST", "/sdapi/v1/img2img")
    assert not takes_images("GET", "/v1/jobs") and not takes_images("POST", "/v1/images/generations")


# ------------------------------------------------------------------------------------------------ OpenAI edits

_alpha_mask = alpha_mask  # OpenAI's convention: transparent right half = edit


def _mask_of(req):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(req.mask_image)))


def test_openai_edit_mask_alpha_becomes_white_repaint(app):
    client, ingress = app
    img = png()
    r = client.post("/v1/images/edits", data={"prompt": "a hat", "n": "2", "size": "64x64", "seed": "7"},
                    files={"image": ("a.png", img, "image/png"), "mask": ("m.png", _alpha_mask(), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["b64_json"]
    req = ingress.calls[-1]
    assert (req.init_image, req.num_images, req.width, req.seed, req.strength) == (img, 2, 64, 7, 1.0)
    mask = _mask_of(req)
    assert mask.shape == (64, 64) and (mask[:, :32] == 0).all() and (mask[:, 32:] == 255).all()


def test_openai_edit_without_mask_uses_the_images_transparency_or_none(app):
    client, ingress = app
    r = client.post("/v1/images/edits", data={"prompt": "a"}, files={"image[]": ("a.png", _alpha_mask())})
    assert r.status_code == 200, r.text
    assert (_mask_of(ingress.calls[-1])[:, 32:] == 255).all()
    r = client.post("/v1/images/edits", data={"prompt": "a", "strength": "0.4"}, files={"image": ("a.png", png())})
    assert r.status_code == 200 and ingress.calls[-1].mask_image is None and ingress.calls[-1].strength == 0.4


@pytest.mark.parametrize("data,files,param", [
    ({"prompt": "a"}, {"image": ("a.png", png()), "mask": ("m.png", png())}, "mask"),  # no alpha channel
    ({"prompt": "a"}, {"image": ("a.png", png()), "mask": ("m.png", _alpha_mask(96, 64))}, "mask"),  # size
    ({"prompt": "a"}, {"image": ("a.gif", bad_images()["gif"])}, "image"),
    ({"prompt": "a"}, {"image": ("a.png", bad_images()["truncated"])}, "image"),
    ({"prompt": "a"}, {"mask": ("m.png", _alpha_mask())}, "image"),  # no image
    ({"prompt": "a"}, {"image[]": ("a.png", png()), "image": ("b.png", png())}, "image"),  # two images
    ({"prompt": "a", "n": "two"}, {"image": ("a.png", png())}, "n"),
    ({"prompt": "a", "size": "65x64"}, {"image": ("a.png", png())}, "size"),
    ({"prompt": "a", "colour": "red"}, {"image": ("a.png", png())}, "colour"),
    ({"prompt": "a", "response_format": "url"}, {"image": ("a.png", png())}, "response_format"),
])
def test_openai_edit_errors_are_400_naming_the_param(app, data, files, param):
    client, ingress = app
    before = len(ingress.calls)
    r = client.post("/v1/images/edits", data=data, files=files)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert len(ingress.calls) == before


def test_unmodified_openai_client_edits(app):
    """The official client's own multipart encoding (image, image[] for lists, mask, numbers as strings)."""
    import openai

    client, ingress = app
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    img = png()
    out = oai.images.edit(image=("a.png", img, "image/png"), mask=("m.png", _alpha_mask(), "image/png"),
                          prompt="a hat", n=1, size="64x64", response_format="b64_json", user="u1")
    assert out.data[0].b64_json and ingress.calls[-1].init_image == img
    out = oai.images.edit(image=[("a.png", img, "image/png")], prompt="a hat", extra_body={"seed": 3})
    assert out.data and ingress.calls[-1].seed == 3
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.edit(image=("a.png", img), mask=("m.png", png()), prompt="a hat")
    assert err.value.body["param"] == "mask"


# ------------------------------------------------------------------------------------------------ A1111

def test_a1111_img2img_maps_fields_and_answers_a1111s_shape(app):
    client, ingress = app
    img = b64(png())
    r = client.post("/sdapi/v1/img2img", json={"prompt": "a cat", "init_images": [img], "denoising_strength": 0.4,
                                               "seed": 5, "sampler_name": "Euler a"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "parameters", "info"} and len(out["images"]) == 1
    info = json.loads(out["info"])
    assert info["denoising_strength"] == 0.4 and info["sampler_name"] == "Euler a"
    assert out["parameters"]["init_images"] is None  # not echoed unless include_init_images
    req = ingress.calls[-1]
    assert (req.init_image, req.strength, req.mask_image, req.seed) == (img, 0.4, None, 5)  # untouched: same str


def test_a1111_inpainting_fill_invert_and_blur(app):
    import io

    import numpy as np
    from PIL import Image

    client, ingress = app
    body = {"prompt": "a", "init_images": [b64(png())], "mask": b64(half_mask()), "mask_blur": 3,
            "inpainting_fill": 1, "inpainting_mask_invert": 1}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    req = ingress.calls[-1]
    mask = np.asarray(Image.open(io.BytesIO(req.mask_image)))
    assert (mask[:, :32] == 255).all() and (mask[:, 32:] == 0).all() and req.mask_blur == 3  # inverted
    assert req.init_image == body["init_images"][0]  # inpainting_fill 1 (original): the image as sent
    assert "inpaint_full_res" in json.loads(r.json()["info"])["sdserve_ignored"]
    r = client.post("/sdapi/v1/img2img", json={**body, "inpainting_fill": 0, "inpainting_mask_invert": 0})
    filled = np.asarray(Image.open(io.BytesIO(ingress.calls[-1].init_image)))
    original = np.asarray(Image.open(io.BytesIO(png())))
    assert r.status_code == 200 and (filled[:, :32] == original[:, :32]).all()  # kept half untouched
    assert filled[:, 40:].std(axis=(0, 1)).max() < original[:, 40:].std() / 4  # masked half: blurred surroundings


def test_a1111_resize_modes(app):
    import io

    from PIL import Image

    client, ingress = app
    for mode in (0, 1):
        r = client.post("/sdapi/v1/img2img", json={"prompt": "a", "init_images": [b64(png(96, 64))],
                                                   "width": 64, "height": 64, "resize_mode": mode})
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(ingress.calls[-1].init_image)).size == (64, 64)


@pytest.mark.parametrize("extra,loc", [
    ({"inpainting_fill": 2, "mask": "MASK"}, ["body", "inpainting_fill"]),
    ({"resize_mode": 2, "width": 64, "height": 128}, ["body", "resize_mode"]),
    ({"init_images": []}, ["body", "init_images"]),
    ({"denoising_strength": 0}, ["body", "denoising_strength"]),
    ({"init_images": ["R0lGODlhAQABAAAAACw="]}, ["body", "init_images", 0]),
    ({"mask": "MASK96"}, ["body", "mask"]),
    ({"alwayson_scripts": {"controlnet": {"args": [{"module": "openpose", "model": "pose", "image": "IMG"}]}}},
     ["body", "alwayson_scripts", "controlnet", "args", 0, "module"]),
    ({"alwayson_scripts": {"controlnet": {"args": [{"module": "none", "model": "pose", "image": "bad!"}]}}},
     ["body", "alwayson_scripts", "controlnet", "args", 0, "image"]),
    ({"alwayson_scripts": {"controlnet": {"args": [{"model": "pose", "image": "IMG", "weight": 9}]}}},
     ["body", "alwayson_scripts", "controlnet", "args", 0, "weight"]),
])
def test_a1111_img2img_refusals_name_the_a1111_field(app, extra, loc):
    client, ingress = app
    subst = {"MASK": b64(half_mask()), "MASK96": b64(half_mask(96, 64)), "IMG": b64(png())}
    body = {"prompt": "a", "init_images": [b64(png())], **extra}
    body = json.loads(json.dumps(body).replace('"MASK96"', json.dumps(subst["MASK96"]))
                      .replace('"MASK"', json.dumps(subst["MASK"])).replace('"IMG"', json.dumps(subst["IMG"])))
    before = len(ingress.calls)
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc
    assert len(ingress.calls) == before


def test_a1111_controlnet_units_map_onto_control_for_txt2img_and_img2img(app):
    client, ingress = app
    pose, edges = b64(png(seed=3)), b64(png(seed=4))
    units = [{"enabled": True, "module": "none", "model": "tiny-pose [abcd1234]", "weight": 0.7, "image": pose,
              "guidance_start": 0.1, "guidance_end": 0.9, "pixel_perfect": True, "processor_res": 512},
             {"enabled": False, "module": "openpose", "model": "x"},  # disabled: skipped, never refused
             {"module": "canny", "model": "tiny-edges", "input_image": "data:image/png;base64," + edges}]
    for route, extra in (("txt2img", {}), ("img2img", {"init_images": [b64(png())]})):
        r = client.post(f"/sdapi/v1/{route}", json={"prompt": "a", **extra,
                                                     "alwayson_scripts": {"controlnet": {"args": units}}})
        assert r.status_code == 200, r.text
        c = ingress.calls[-1].control
        assert [(x.model, x.preprocess, x.scale, x.start, x.end) for x in c] == [
            ("tiny-pose", "none", 0.7, 0.1, 0.9), ("tiny-edges", "canny", 1.0, 0.0, 1.0)]
        assert c[0].image == pose
        info = json.loads(r.json()["info"])
        assert "ControlNet 0" in info["extra_generation_params"]
        assert "alwayson_scripts.controlnet.args.0.pixel_perfect" in info["sdserve_ignored"]


def test_controlnet_listings_without_controlnets(app):
    client, _ = app
    assert client.get("/v1/controlnets").json() == {"object": "list", "data": []}
    assert client.get("/controlnet/model_list").json() == {"model_list": []}
    assert client.get("/controlnet/module_list").json()["module_list"] == ["none", "canny"]
    assert client.get("/controlnet/version").json()["version"] >= 1
