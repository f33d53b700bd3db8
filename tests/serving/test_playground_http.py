"""The playground's routes over real Serve: the page and its assets, /v1/capabilities, route_prefix handling."""
from __future__ import annotations

import httpx
import pytest

from core.schedulers import SCHEDULERS
from tests.serving.conftest import KEYS, STRICT_KEYS

pytestmark = pytest.mark.integration


def test_page_and_assets_are_served_with_a_strict_csp(serve_url):
    with httpx.Client(base_url=serve_url, timeout=60) as c:  # no key: the page itself is public
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for testid in ("prompt", "negative-prompt", "generate", "progress", "preview", "history", "cancel"):
            assert f'data-testid="{testid}"' in page.text
        # relative asset URLs only, so the page works under a route_prefix
        assert 'src="playground/app.js"' in page.text and 'href="playground/style.css"' in page.text
        js = c.get("/playground/app.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert '"v1/jobs"' in js.text and '"/v1/' not in js.text  # no absolute API path in the page's code
        assert c.get("/playground/style.css").headers["content-type"].startswith("text/css")
        for bad in ("/playground/routes.py", "/playground/..%2Froutes.py", "/playground/index.html"):
            assert c.get(bad).status_code == 404, bad


def test_capabilities_need_the_key_and_describe_models(serve_url):
    with httpx.Client(base_url=serve_url, timeout=60) as c:
        assert c.get("/v1/capabilities").status_code == 401
        caps = c.get("/v1/capabilities", headers={"Authorization": f"Bearer {KEYS[1]}"}).json()
    assert caps["auth_required"] is True and caps["jobs"] is True
    assert caps["default_model"] == "tiny-sd"
    assert [m["id"] for m in caps["models"]] == ["tiny-sd", "tiny-b"]
    assert caps["schedulers"] == sorted(SCHEDULERS) and "png" in caps["output_formats"]
    tiny = caps["models"][0]
    assert tiny["limits"]["max_steps"] == 400 and tiny["scheduler"] == "euler" and tiny["noise_model"] is True
    assert tiny["previews"] == {"method": "latent2rgb", "every_n_steps": 5}
    # features a model lacks are absent, so clients hide their controls; image inputs every model has
    assert not {"loras", "controlnets"} & set(tiny) and tiny["image_inputs"] == ["init_image", "mask"]
    assert caps["max_image_body_bytes"] == 32 * 1024 * 1024
    assert "/v1/capabilities" in httpx.get(f"{serve_url}/openapi.json").json()["paths"]


def test_under_a_route_prefix(serve_url):
    with httpx.Client(base_url=serve_url, timeout=60) as c:
        r = c.get("/strict")  # relative URLs need the slash: redirected to /strict/
        assert r.is_redirect and httpx.URL(r.headers["location"]).path == "/strict/"
        page = c.get("/strict/")
        assert page.status_code == 200 and 'data-testid="generate"' in page.text
        assert c.get("/strict/playground/app.js").status_code == 200
        caps = c.get("/strict/v1/capabilities", headers={"Authorization": f"Bearer {STRICT_KEYS[2]}"}).json()
    assert caps["jobs"] is False and caps["max_body_bytes"] == 2048
