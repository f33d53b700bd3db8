"""/openapi.json tells the truth: a schema fuzzer (schemathesis) against a live app finds no undocumented status
code or content type, no server error and no schema-valid request refused by an unstated limit. Plus the smaller
HTTP promises: the job Location header honours the route prefix, /v1/models reports the detected family.

Bounded: a handful of generated requests per operation on a tiny model with small limits (a few minutes at most
on 2 CPUs). The OpenAPI document itself is checked without Ray first.
"""
from __future__ import annotations

import types

import pytest

from serving.config import ServingConfig

KEY = "contract-key"
# max_steps >= tiny-sd's default of 4 steps: a request that leaves `steps` out must be accepted.
LIMITS = {"max_width": 96, "max_height": 96, "max_pixels": 96 * 96, "max_steps": 4, "max_images_per_request": 2,
          "max_batch_size": 2, "max_prompt_chars": 200}


def contract_config() -> dict:
    return {"app_name": "contract", "route_prefix": "/contract", "security": {"api_keys": [KEY]},
            "jobs": {"backend": "local", "concurrency": 1},
            "models": [{"engine": {"name": "tiny-c", "device": "cpu", "limits": LIMITS,
                                   "optimization": {"warmup_steps": 0},
                                   "controlnets": [{"name": "tiny-cn", "source": "embedded:tiny-sd-controlnet"}]},
                        "deployment": {"num_gpus": 0, "num_cpus": 0.5}}]}


def offline_openapi(config: dict) -> dict:
    """The app's document, built by the real factory with no Ray (the factory only needs config, jobs and the drain gate)."""
    from serving.http.app import create_app

    from serving.drain import DrainGate

    ingress = types.SimpleNamespace(config=ServingConfig.model_validate(config), jobs=None, gate=DrainGate())
    return create_app(ingress).openapi()


def test_document_states_limits_codes_and_content_types():
    doc = offline_openapi(contract_config())
    req = doc["components"]["schemas"]["GenerationRequest"]["properties"]
    num = lambda p: next(s for s in p.get("anyOf", [p]) if s.get("type") not in (None, "null"))  # noqa: E731
    assert num(req["width"])["maximum"] == 96 and num(req["steps"])["maximum"] == 4
    assert req["num_images"]["maximum"] == 2 and req["prompt"]["maxLength"] == 200
    assert num(req["model"])["enum"] == ["tiny-c"] and "euler" in num(req["scheduler"])["enum"]
    assert "9216 pixels" in req["width"]["description"]
    gen = doc["paths"]["/v1/generate"]["post"]["responses"]
    assert {"400", "401", "413", "422", "429", "503"} <= set(gen)
    assert "image/png" in gen["200"]["content"] and "bytes" in gen["413"]["description"]
    assert "text/event-stream" in doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert "409" in doc["paths"]["/v1/jobs/{job_id}/result"]["get"]["responses"]
    assert "65536 bytes get 413" in doc["info"]["description"] or "bytes get 413" in doc["info"]["description"]


@pytest.fixture(scope="module")
def contract_url(serve_url):
    from ray import serve

    from serving.builder import build_app

    serve.run(build_app(ServingConfig.model_validate(contract_config())), name="contract",
              route_prefix="/contract")
    yield f"{serve_url}/contract"
    try:
        serve.delete("contract", _blocking=False)  # (not waiting for the replicas to stop: conftest.py)
    except Exception:  # noqa: BLE001 - the directory's last test may already have shut Serve down
        pass


@pytest.mark.integration
def test_job_location_honours_route_prefix(contract_url):
    import httpx

    r = httpx.post(f"{contract_url}/v1/jobs", json={"prompt": "a fox", "steps": 1},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 202
    assert r.headers["location"] == f"/contract/v1/jobs/{r.json()['id']}"
    assert httpx.get(contract_url.rsplit("/contract", 1)[0] + r.headers["location"],
                     headers={"Authorization": f"Bearer {KEY}"}, timeout=60).status_code == 200


@pytest.mark.integration
def test_models_report_detected_family(contract_url):
    import httpx

    r = httpx.get(f"{contract_url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    (model,) = r.json()["data"]
    assert model["id"] == "tiny-c" and model["family"] == "sd15"  # configured 'auto'


@pytest.mark.integration
@pytest.mark.slow
def test_schemathesis_finds_no_contract_violation(contract_url):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import checks as registry  # checks are looked up by name in schemathesis 4

    from hypothesis import strategies as st

    from serving.http.openapi_images import ALPHA_MASK_FORMAT, IMAGE_FORMAT
    from tests.serving.image_samples import alpha_mask, b64, png

    # The document's image fields name their format (an encoded image, base64 or as a file part): one valid
    # image of a size every model accepts; the edits mask is a PNG with transparency of the same size.
    schemathesis.openapi.format(IMAGE_FORMAT, st.just(b64(png(64, 64))))
    schemathesis.openapi.format(ALPHA_MASK_FORMAT, st.just(b64(alpha_mask(64, 64))))
    schema = schemathesis.openapi.from_url(f"{contract_url}/openapi.json")
    checks = [getattr(registry, name) for name in ("not_a_server_error", "status_code_conformance",
                                                   "content_type_conformance", "response_schema_conformance",
                                                   "positive_data_acceptance")]
    failures: list[str] = []
    ran = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=6, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case):
            nonlocal ran
            ran += 1
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=checks, timeout=120)

        try:
            run()
        except Exception as err:  # noqa: BLE001 - collect every operation's failure, report them all
            failures.append(f"{operation.label}: {str(err)[:1500]}")
    assert ran >= 20
    assert not failures, "\n\n".join(failures)


def test_openai_size_and_response_format_are_stated():
    doc = offline_openapi(contract_config())
    props = doc["components"]["schemas"]["OpenAIImageRequest"]["properties"]
    size = next(s for s in props["size"].get("anyOf", [props["size"]]) if s.get("type") == "string")
    assert "auto" in size["enum"] and "96x96" in size["enum"] and "104x96" not in size["enum"]
    fmt = next(s for s in props["response_format"].get("anyOf", [props["response_format"]]) if s.get("enum"))
    assert fmt["enum"] == ["b64_json"]


def test_image_inputs_and_a1111_refusals_are_stated():
    doc = offline_openapi(contract_config())
    comps = doc["components"]["schemas"]
    gen = comps["GenerationRequest"]
    assert gen["dependentRequired"] == {"strength": ["init_image"], "mask_image": ["init_image"]}
    assert gen["properties"]["init_image"]["anyOf"][0]["format"] == "sdserve-image"
    assert comps["ControlInput"]["properties"]["model"]["enum"] == ["tiny-cn"]  # the configured ControlNets
    no_cn = offline_openapi({**contract_config(), "models": [{"engine": {"name": "tiny-c"}}]})
    assert no_cn["components"]["schemas"]["GenerationRequest"]["properties"]["control"]["maxItems"] == 0
    body = doc["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert body["multipart/form-data"]["schema"]["properties"]["request"]["$ref"].endswith("GenerationRequestPart")
    t2i, i2i = comps["Txt2ImgRequest"]["properties"], comps["Img2ImgRequest"]
    assert t2i["enable_hr"]["enum"] == [False] and "Karras" not in t2i["scheduler"]["enum"]
    assert "Euler a" in t2i["sampler_name"]["enum"]
    unit = t2i["alwayson_scripts"]["properties"]["controlnet"]["properties"]["args"]["items"]
    assert unit["properties"]["model"]["enum"] == ["tiny-cn"] and unit["properties"]["module"]["enum"] == ["none", "canny"]
    assert {"prompt", "init_images"} <= set(i2i["required"])
    assert i2i["properties"]["inpainting_fill"]["enum"] == [0, 1]
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
        assert {"401", "413", "422"} <= set(doc["paths"][path]["post"]["responses"])
    edits = doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert edits["properties"]["n"]["type"] == "integer" and edits["required"] == ["image", "prompt"]
    assert "image_inputs.max_body_bytes" in doc["paths"]["/v1/generate"]["post"]["responses"]["413"]["description"]
