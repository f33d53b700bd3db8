"""Engine.resolve: per-model defaults and limits -> GenerationError(kind='validation', field=...). No model load."""
from __future__ import annotations

import pytest

from core.engine import TINY_DEFAULTS, Engine
from core.schemas import MAX_SEED, GenerationError, GenerationRequest


@pytest.fixture(scope="module")
def limited(make_config):
    return Engine(make_config(name="fox", limits={"max_width": 512, "max_height": 512, "max_pixels": 256 * 256,
                                                  "max_steps": 20, "max_images_per_request": 2,
                                                  "max_prompt_chars": 40}))


def rejected(engine, **kw) -> GenerationError:
    with pytest.raises(GenerationError) as info:
        engine.resolve(GenerationRequest(prompt=kw.pop("prompt", "a fox"), **kw))
    assert info.value.kind == "validation"
    return info.value


@pytest.mark.parametrize("kw, field, words", [
    ({"width": 520}, "width", "512"),
    ({"height": 1024}, "height", "512"),
    ({"width": 512, "height": 512}, "width", "max_pixels"),
    ({"steps": 21}, "steps", "20"),
    ({"num_images": 3}, "num_images", "2"),
    ({"prompt": "x" * 41}, "prompt", "40 characters"),
    ({"model": "wolf"}, "model", "'fox'"),
])
def test_limits_name_the_field(limited, kw, field, words):
    err = rejected(limited, **kw)
    assert err.field == field and words in err.message and field in err.message


def test_defaults_filled(limited):
    r = limited.resolve(GenerationRequest(prompt="a fox"))
    w, h, steps, guidance = TINY_DEFAULTS
    assert (r.width, r.height, r.steps, r.guidance_scale) == (w, h, steps, guidance)
    assert r.scheduler == "euler" and r.negative_prompt == "" and r.model == "fox"
    assert 0 <= r.seed <= MAX_SEED


def test_request_values_win_and_model_name_accepted(limited):
    r = limited.resolve(GenerationRequest(prompt="a fox", model="fox", width=128, steps=20, seed=5,
                                          guidance_scale=0.0, scheduler="ddim", negative_prompt="blur"))
    assert (r.width, r.steps, r.seed, r.guidance_scale, r.scheduler, r.negative_prompt) == (
        128, 20, 5, 0.0, "ddim", "blur")


def test_config_defaults_used(make_config):
    eng = Engine(make_config(scheduler="unipc", defaults={"width": 96, "steps": 3, "guidance_scale": 1.0,
                                                          "negative_prompt": "ugly"}))
    r = eng.resolve(GenerationRequest(prompt="a fox"))
    assert (r.width, r.steps, r.guidance_scale, r.scheduler, r.negative_prompt) == (96, 3, 1.0, "unipc", "ugly")


def test_seed_drawn_per_request(limited):
    seeds = {limited.resolve(GenerationRequest(prompt="a fox")).seed for _ in range(8)}
    assert len(seeds) > 1


def test_generate_returns_validation_errors_in_place(engine, req, ok):
    """A bad request gets its error; the others in the same call still run."""
    out = engine.generate([req(seed=1), req(model="nope"), req(seed=2, width=4096)])
    ok(out[0])
    assert isinstance(out[1], GenerationError) and out[1].field == "model"
    assert isinstance(out[2], GenerationError) and out[2].field == "width"
