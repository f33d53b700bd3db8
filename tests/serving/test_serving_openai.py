"""The OpenAI-compatible routes, exercised with the unmodified `openai` client (and raw HTTP for shapes)."""
from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.serving.conftest import KEYS

pytestmark = pytest.mark.integration


@pytest.fixture
def oai(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=KEYS[0], max_retries=0, timeout=120)


def test_openai_client_generates_images(oai):
    resp = oai.images.generate(prompt="a lighthouse", n=2, size="64x64", response_format="b64_json",
                               extra_body={"seed": 11, "steps": 3})
    assert resp.created > 0 and len(resp.data) == 2
    for item, seed in zip(resp.data, (11, 12)):
        img = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert img.size == (64, 64)
        assert item.model_extra["seed"] == seed


def test_openai_client_default_params(oai):
    resp = oai.images.generate(prompt="plain call", model="tiny-b")
    assert len(resp.data) == 1 and resp.data[0].b64_json


def test_same_seed_same_bytes_as_native_route(oai, client):
    resp = oai.images.generate(prompt="cmp", size="64x64", extra_body={"seed": 99})
    native = client.post("/v1/generate", json={"prompt": "cmp", "seed": 99, "width": 64, "height": 64})
    assert base64.b64decode(resp.data[0].b64_json) == native.content


def test_openai_models_list(oai):
    models = oai.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["tiny-sd", "tiny-b"] and all(m.object == "model" and m.owned_by == "sdserve" for m in models.data)


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 0}, "n"),
    ({"size": "huge"}, "size"),
    ({"size": "65x64"}, "size"),
    ({"size": "4096x4096"}, "size"),
    ({"prompt": ""}, "prompt"),
    ({"extra_body": {"steps": 999}}, "steps"),
    ({"extra_body": {"unknown_field": 1}}, "unknown_field"),
    ({"response_format": "url"}, "response_format"),
])
def test_openai_errors_are_400_with_param(oai, kwargs, param):
    kwargs = {"prompt": "x", **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(**kwargs)
    assert err.value.status_code == 400
    body = err.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error" and body["message"]


def test_openai_unknown_model_is_404_listing_models(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.images.generate(prompt="x", model="dall-e-3")
    assert err.value.body["code"] == "model_not_found"
    assert "tiny-sd" in err.value.body["message"] and "tiny-b" in err.value.body["message"]


def test_openai_auth_error_shape(serve_url):
    bad = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.images.generate(prompt="x")
    assert err.value.body["type"] == "authentication_error"
    r = httpx.post(f"{serve_url}/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_raw_response_shape(serve_url):
    r = httpx.post(f"{serve_url}/v1/images/generations", json={"prompt": "x", "size": "64x64", "user": "u1",
                                                                 "quality": "hd", "style": "vivid"},
                   headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert isinstance(body["created"], int) and set(body["data"][0]) >= {"b64_json"}


def test_openai_n_over_the_model_limit_names_n(oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(prompt="x", n=9, size="64x64")  # the model's max_images_per_request is 8
    body = err.value.body
    assert body["param"] == "n" and body["message"].startswith("n:") and "num_images" not in body["message"]


@pytest.mark.parametrize("raw, param, words", [
    (b'{"prompt": "x", "size": "64x64\\n"}', "size", "WIDTHxHEIGHT"),  # a trailing newline is not a size
    (b'{"prompt": "x", "n": true}', "n", "not a boolean"),
    (b'{"prompt": "x", "seed": true}', "seed", "not a boolean"),
    (b'{"prompt": "x", "guidance_scale": NaN}', "guidance_scale", "finite number"),
    (b'{"prompt": "x",, }', None, "not valid JSON"),  # malformed: no character offset as param
])
def test_openai_error_details(serve_url, raw, param, words):
    r = httpx.post(f"{serve_url}/v1/images/generations", content=raw, timeout=60,
                   headers={"Authorization": f"Bearer {KEYS[0]}", "content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]  # OpenAI's shape, also for malformed JSON
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and words in err["message"], err
