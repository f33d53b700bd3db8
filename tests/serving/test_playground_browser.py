"""The playground in a real browser (Debian's chromium driven by Playwright) against real Serve and the embedded
tiny models: key entry, generate with per-step progress and a result image, history, cancel a long job, the
sync fallback under a route_prefix, and no console errors. Skips when chromium or playwright is missing
(`.ci/ensure-chromium` installs chromium for `make test`).

SDSERVE_PLAYGROUND_SCREENSHOT=path writes a screenshot of the page with a result (docs/playground.png).
"""
from __future__ import annotations

import os
import shutil

import pytest

from tests.serving.conftest import KEYS, STRICT_KEYS
from tests.serving.test_serving_loras import KEY as LORA_KEY, lora_app  # noqa: F401 - the LoRA app fixture

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/ensure-chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(90_000)
    problems: list[str] = []
    p.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    p.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    p.problems = problems
    yield p
    context.close()


def _enter_key(page, key: str) -> None:
    page.get_by_test_id("api-key").fill(key)
    page.click("#save-key")
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")


def test_generate_with_progress_history_and_cancel(page, serve_url):
    page.goto(serve_url + "/")
    page.get_by_test_id("api-key").wait_for(state="visible")  # the server has keys: the page asks for one
    # The refused capabilities call before the key is entered logs a 401 resource error; that one is expected.
    page.problems.clear()
    _enter_key(page, KEYS[0])
    assert page.locator("#model option").all_inner_texts()[:2] == ["tiny-sd (random weights)", "tiny-b (random weights)"]
    assert page.get_by_test_id("generate").is_enabled()
    assert page.locator("#loras-box").is_hidden() and page.locator("#controlnet-box").is_hidden()
    assert page.locator("#image-inputs-box").is_visible()  # img2img and inpainting: every model (issue 19)

    # 1. a quick job: result image, progress at its end, history entry with the job's parameters
    page.get_by_test_id("prompt").fill("a lighthouse at dawn")
    page.get_by_test_id("negative-prompt").fill("blurry")
    page.get_by_test_id("steps").fill("6")
    page.get_by_test_id("seed-random").uncheck()
    page.get_by_test_id("seed").fill("1234")
    page.get_by_test_id("generate").click()
    page.get_by_test_id("result-image").first.wait_for(state="visible")
    assert page.get_by_test_id("preview").is_hidden()  # shown only while `preview` events arrive
    progress = page.get_by_test_id("progress")
    assert progress.evaluate("p => [p.value, p.max]") == [6, 6]
    assert page.get_by_test_id("result-image").evaluate("img => img.naturalWidth") == 64  # tiny-sd default size
    page.locator("[data-testid=history-item]").first.wait_for()
    item = page.get_by_test_id("history").locator("[data-testid=history-item]").first.inner_text()
    assert "a lighthouse at dawn" in item and "seed 1234" in item and "6 steps" in item
    if os.environ.get("SDSERVE_PLAYGROUND_SCREENSHOT"):
        page.screenshot(path=os.environ["SDSERVE_PLAYGROUND_SCREENSHOT"], full_page=True)

    # 2. a long job: per-step progress is shown while it runs, then cancel stops it
    page.get_by_test_id("steps").fill("400")
    page.get_by_test_id("generate").click()
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('step ')"
                           " && document.getElementById('progress').max === 400"
                           " && document.getElementById('progress').value >= 1")
    page.get_by_test_id("preview").wait_for(state="visible")  # a live preview (SSE `preview` event) arrived
    assert page.get_by_test_id("preview").evaluate("img => img.src.startsWith('data:image/jpeg;base64,')")
    page.get_by_test_id("cancel").click()
    page.wait_for_function("() => document.getElementById('status').textContent === 'cancelled'")
    assert page.get_by_test_id("progress").evaluate("p => p.value") < 400
    assert page.get_by_test_id("cancel").is_hidden() and page.get_by_test_id("generate").is_enabled()
    assert page.locator("[data-testid=history-item]").count() == 1  # the cancelled job left no entry
    assert page.problems == []

    # 3. the history survives a reload (localStorage) and "Use" puts its parameters back in the form
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")  # stored key used
    assert page.locator("[data-testid=history-item]").count() == 1
    page.locator("[data-testid=history-item] button", has_text="Use").click()
    assert page.get_by_test_id("prompt").input_value() == "a lighthouse at dawn"
    assert page.get_by_test_id("seed").input_value() == "1234" and page.get_by_test_id("steps").input_value() == "6"
    assert page.problems == []


def test_sync_fallback_under_a_route_prefix(page, serve_url):
    page.goto(serve_url + "/strict")  # redirected to /strict/; every call stays under the prefix
    page.get_by_test_id("api-key").wait_for(state="visible")
    page.problems.clear()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    _enter_key(page, STRICT_KEYS[2])
    assert page.get_by_test_id("cancel").is_hidden()
    page.get_by_test_id("prompt").fill("a red bicycle")
    page.get_by_test_id("steps").fill("2")
    page.get_by_test_id("generate").click()
    page.get_by_test_id("result-image").first.wait_for(state="visible")
    api_calls = [u for u in requests if "/v1/" in u]
    assert api_calls and all(u.startswith(serve_url + "/strict/v1/") for u in api_calls), api_calls
    assert page.problems == []


def test_lora_picker_lists_the_library_and_sends_the_choice(page, lora_app):
    """A model with a LoRA library: the page lists its LoRAs (GET v1/loras from the replicas) and a ticked one
    goes out in the request's `loras` field; the image comes back."""
    page.goto(lora_app + "/")
    page.get_by_test_id("api-key").wait_for(state="visible")
    page.problems.clear()
    _enter_key(page, LORA_KEY)
    page.locator("#loras-box").wait_for(state="visible")
    assert sorted(page.locator("#loras label span").all_inner_texts()) == ["ink", "oil", "pencil"]
    page.locator("#loras label", has_text="oil").locator("input[type=checkbox]").check()
    page.get_by_test_id("prompt").fill("a harbour")
    page.get_by_test_id("steps").fill("2")
    with page.expect_request(lambda r: r.method == "POST" and "/v1/" in r.url) as sent:
        page.get_by_test_id("generate").click()
    assert sent.value.post_data_json["loras"] == [{"name": "oil", "weight": 1}]
    page.get_by_test_id("result-image").first.wait_for(state="visible")
    assert page.problems == []
