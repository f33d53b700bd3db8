"""A1111 compatibility, the pure mapping (serving/a1111.py): sampler names, request translation, response shapes,
progress. No Ray. The shapes follow AUTOMATIC1111's modules/api/models.py and api.py."""
from __future__ import annotations

import json

import pytest

from core.schedulers import SCHEDULERS
from core.schemas import GeneratedImage, GenerationResult
from serving.a1111 import SAMPLERS, A1111Error, ModelInfo, Txt2ImgRequest, find_model, \
    options_response, resolve_sampler, samplers_response, schedulers_response, sd_models_response, \
    to_generation_request, txt2img_response
from serving.a1111_progress import ProgressBoard

MODELS = [ModelInfo("tiny-sd", "embedded:tiny-sd", "euler", 8), ModelInfo("tiny-b", "/models/b.safetensors",
                                                                            "dpmpp_2m_karras", 4)]


@pytest.mark.parametrize("sampler,scheduler,expected", [
    ("Euler a", None, "euler_a"),
    ("Euler", None, "euler"),
    ("Euler", "Karras", "euler_karras"),
    ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
    ("DPM++ 2M", "karras", "dpmpp_2m_karras"),
    ("DPM++ 2M", None, "dpmpp_2m_karras"),  # A1111's "Automatic" is Karras for DPM++ 2M
    ("DPM++ 2M", "Uniform", "dpmpp_2m"),
    ("DPM++ 2M SDE", None, "dpmpp_2m_sde"),
    ("DPM++ 2M SDE", "Karras", "dpmpp_2m_sde_karras"),
    ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),  # pre-1.9 combined name
    ("DPM++ 2M SDE Karras", None, "dpmpp_2m_sde_karras"),
    ("UniPC", None, "unipc"), ("DDIM", None, "ddim"), ("LCM", None, "lcm"), ("Heun", None, "heun"),
    ("DPM2", None, "kdpm2"), ("DPM2 a", None, "kdpm2_a"), ("DEIS", None, "deis"), ("PLMS", None, "pndm"),
    ("PNDM", None, "pndm"), ("k_euler_a", None, "euler_a"), ("euler A", "automatic", "euler_a"),
])
def test_sampler_names_map_onto_sdserve_schedulers(sampler, scheduler, expected):
    name, label, ours = resolve_sampler(sampler, scheduler, "euler")
    assert ours == expected and ours in SCHEDULERS
    assert name in {s.name for s in SAMPLERS} and label in {"Automatic", "Uniform", "Karras"}


def test_default_scheduler_is_named_the_a1111_way():
    assert resolve_sampler(None, None, "euler") == ("Euler", "Automatic", "euler")
    assert resolve_sampler("", None, "dpmpp_2m_karras") == ("DPM++ 2M", "Karras", "dpmpp_2m_karras")
    assert resolve_sampler(None, None, "dpmpp_2m") == ("DPM++ 2M", "Uniform", "dpmpp_2m")
    # a scheduler without a sampler applies to the model's default sampler (never silently dropped)
    assert resolve_sampler(None, "Karras", "euler") == ("Euler", "Karras", "euler_karras")
    with pytest.raises(A1111Error) as info:
        resolve_sampler(None, "Karras", "euler_a")
    assert info.value.field == "scheduler"


@pytest.mark.parametrize("sampler,scheduler,field", [
    ("Euler b", None, "sampler_name"), ("LMS", None, "sampler_name"), ("DPM++ SDE", None, "sampler_name"),
    ("Euler", "Exponential", "scheduler"), ("Euler a", "Karras", "scheduler"),
])
def test_unknown_sampler_or_scheduler_names_the_field(sampler, scheduler, field):
    with pytest.raises(A1111Error) as info:
        resolve_sampler(sampler, scheduler, "euler")
    assert info.value.field == field and info.value.status == 422
    if field == "sampler_name":
        assert "Euler a" in info.value.message  # lists what is available


def test_translation_maps_a1111_fields():
    body = Txt2ImgRequest(prompt="a cat", negative_prompt="dog", seed=42, sampler_name="DPM++ 2M",
                          scheduler="Karras", batch_size=2, n_iter=3, steps=12, cfg_scale=5.5, width=128, height=96)
    plan = to_generation_request(body, MODELS, "tiny-sd")
    r = plan.request
    assert (r.prompt, r.negative_prompt, r.seed, r.scheduler, r.num_images, r.steps, r.guidance_scale, r.width,
            r.height, r.model, r.output_format) == ("a cat", "dog", 42, "dpmpp_2m_karras", 6, 12, 5.5, 128, 96,
                                                     "tiny-sd", "png")
    assert (plan.sampler_name, plan.scheduler_label, plan.ignored) == ("DPM++ 2M", "Karras", ())


def test_seed_minus_one_is_random_and_defaults_come_from_the_model():
    r = to_generation_request(Txt2ImgRequest(prompt="x", seed=-1), MODELS, "tiny-b").request
    assert r.seed is None and r.width is None and r.steps is None and r.model == "tiny-b"
    assert r.scheduler == "dpmpp_2m_karras"  # the model's default scheduler


def test_override_settings_picks_the_model_by_title_or_name():
    for title in ("tiny-b", "tiny-b.safetensors", "tiny-b.safetensors [abc123]"):
        body = Txt2ImgRequest(prompt="x", override_settings={"sd_model_checkpoint": title})
        assert to_generation_request(body, MODELS, "tiny-sd").request.model == "tiny-b"
    with pytest.raises(A1111Error) as info:
        to_generation_request(Txt2ImgRequest(prompt="x", override_settings={"sd_model_checkpoint": "sdxl"}),
                              MODELS, "tiny-sd")
    assert info.value.field == "override_settings.sd_model_checkpoint" and "tiny-sd, tiny-b" in info.value.message


def test_image_count_is_bounded_by_the_model_naming_the_a1111_field():
    with pytest.raises(A1111Error) as info:
        to_generation_request(Txt2ImgRequest(prompt="x", batch_size=5), MODELS, "tiny-b")
    assert info.value.field == "batch_size" and "at most 4" in info.value.message
    with pytest.raises(A1111Error) as info:
        to_generation_request(Txt2ImgRequest(prompt="x", batch_size=3, n_iter=3), MODELS, "tiny-sd")
    assert info.value.field == "n_iter" and "9 images" in info.value.message
    assert to_generation_request(Txt2ImgRequest(prompt="x", batch_size=2, n_iter=4), MODELS,
                                 "tiny-sd").request.num_images == 8


@pytest.mark.parametrize("fields,field", [
    ({"enable_hr": True}, "enable_hr"), ({"restore_faces": True}, "restore_faces"), ({"tiling": True}, "tiling"),
    ({"styles": ["cinematic"]}, "styles"), ({"subseed_strength": 0.3}, "subseed_strength"),
    ({"script_name": "x/y/z plot"}, "script_name"), ({"alwayson_scripts": {"adetailer": {"args": []}}},
                                                     "alwayson_scripts.adetailer"),
    ({"refiner_checkpoint": "sdxl-refiner"}, "refiner_checkpoint"), ({"prompt": "  "}, "prompt"),
])
def test_features_that_would_change_the_image_are_refused(fields, field):
    with pytest.raises(A1111Error) as info:
        to_generation_request(Txt2ImgRequest(**{"prompt": "x", **fields}), MODELS, "tiny-sd")
    assert info.value.field == field


def test_schema_bounds_and_unknown_fields_name_the_field():
    for fields, field in [({"width": 100}, "width"), ({"steps": 0}, "steps"), ({"seed": -2}, "seed"),
                          ({"batch_size": 0}, "batch_size"), ({"sampler": "Euler"}, "sampler")]:
        with pytest.raises(ValueError) as info:
            Txt2ImgRequest(prompt="x", **fields)
        assert info.value.errors()[0]["loc"][0] == field


def test_a_full_client_payload_is_accepted_and_inert_settings_reported():
    # What webuiapi's txt2img() sends with its defaults (every field, explicitly).
    payload = {"enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
               "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
               "hr_resize_y": 0, "prompt": "a cat", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
               "seed_resize_from_h": 0, "seed_resize_from_w": 0, "sampler_name": "Euler a", "batch_size": 1,
               "n_iter": 1, "steps": 20, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": False,
               "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "",
               "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
               "override_settings_restore_afterwards": True, "script_args": [], "script_name": None,
               "send_images": True, "save_images": False, "alwayson_scripts": {}, "sampler_index": "Euler a"}
    plan = to_generation_request(Txt2ImgRequest.model_validate(payload), MODELS, "tiny-sd")
    assert plan.request.scheduler == "euler_a" and plan.request.num_images == 1
    # Values with an effect in A1111 that sdserve does not apply are listed; inert defaults are not.
    assert {"eta", "s_noise", "denoising_strength", "hr_upscaler"} <= set(plan.ignored)
    assert "do_not_save_samples" not in plan.ignored and "enable_hr" not in plan.ignored
    body = Txt2ImgRequest(prompt="x", override_settings={"CLIP_stop_at_last_layers": 2})
    assert to_generation_request(body, MODELS, "tiny-sd").ignored == ("override_settings.CLIP_stop_at_last_layers",)


def _result(n: int, seed: int = 7) -> GenerationResult:
    return GenerationResult(images=[GeneratedImage(data=b"png%d" % i, seed=seed + i, media_type="image/png")
                                    for i in range(n)], width=64, height=96, steps=3, guidance_scale=7.5,
                            scheduler="euler_a", model="tiny-sd", output_format="png", batch_size=n)


def test_txt2img_response_has_a1111_shape():
    body = Txt2ImgRequest(prompt="a cat", negative_prompt="dog", sampler_name="Euler a", batch_size=2, eta=0.5)
    plan = to_generation_request(body, MODELS, "tiny-sd")
    out = txt2img_response(body, plan, _result(2), "20260101120000")
    assert set(out) == {"images", "parameters", "info"}
    import base64

    assert [base64.b64decode(i) for i in out["images"]] == [b"png0", b"png1"]
    assert isinstance(out["info"], str)  # A1111 clients json.loads() it
    info = json.loads(out["info"])
    assert (info["seed"], info["all_seeds"], info["width"], info["height"], info["steps"], info["cfg_scale"],
            info["sampler_name"], info["sd_model_name"]) == (7, [7, 8], 64, 96, 3, 7.5, "Euler a", "tiny-sd")
    assert info["all_prompts"] == ["a cat", "a cat"] and info["negative_prompt"] == "dog"
    assert "Seed: 8" in info["infotexts"][1] and "Sampler: Euler a" in info["infotexts"][0]
    assert info["sdserve_ignored"] == ["eta"] and info["job_timestamp"] == "20260101120000"
    params = out["parameters"]
    assert (params["prompt"], params["seed"], params["sampler_name"], params["batch_size"], params["cfg_scale"]) == \
        ("a cat", 7, "Euler a", 2, 7.5)
    assert "guidance_scale" not in params and "num_images" not in params  # A1111's names only
    nosend = Txt2ImgRequest(prompt="a cat", send_images=False)
    assert txt2img_response(nosend, to_generation_request(nosend, MODELS, "tiny-sd"), _result(1), "0")["images"] \
        == []


def test_list_shapes_match_a1111_items():
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers_response())
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ 2M SDE", "UniPC", "DDIM", "LCM"} <= \
        {s["name"] for s in samplers_response()}
    assert {s["name"] for s in schedulers_response()} == {"automatic", "uniform", "karras"}
    assert all(set(s) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for s in schedulers_response())
    models = sd_models_response(MODELS)
    assert all(set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"} for m in models)
    assert [m["title"] for m in models] == ["tiny-sd", "tiny-b"] and models[1]["filename"] == "/models/b.safetensors"
    assert options_response("tiny-b")["sd_model_checkpoint"] == "tiny-b"
    assert find_model("tiny-sd.ckpt", MODELS, "f").name == "tiny-sd"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_progress_board_reports_a1111_progress_and_interrupts():
    clock = FakeClock()
    board = ProgressBoard(clock)
    idle = board.progress()
    assert (idle["progress"], idle["eta_relative"], idle["current_image"]) == (0.0, 0.0, None)
    assert set(idle["state"]) == {"skipped", "interrupted", "stopping_generation", "job", "job_count",
                                  "job_timestamp", "job_no", "sampling_step", "sampling_steps"}
    assert idle["state"]["job_count"] == 0
    key, gen = board.begin("txt2img")
    cancelled = []
    gen.cancel = lambda: cancelled.append(key)
    gen.step, gen.steps = 5, 10
    clock.now += 10
    p = board.progress()
    assert p["progress"] == pytest.approx(0.51) and p["eta_relative"] == pytest.approx(10 / 0.51 - 10)
    assert (p["state"]["job"], p["state"]["job_count"], p["state"]["sampling_step"],
            p["state"]["sampling_steps"]) == ("txt2img", 1, 5, 10)
    key2, gen2 = board.begin("txt2img")  # a second, later one: the oldest is reported, both are counted
    assert board.progress()["state"]["job_count"] == 2 and board.progress()["state"]["sampling_step"] == 5
    assert board.interrupt() == 2 and cancelled == [key] and gen.interrupted and gen2.interrupted
    board.end(key)
    board.end(key2)
    after = board.progress()
    assert after["state"]["interrupted"] is True and after["state"]["job_count"] == 0
    board.begin("txt2img")
    assert board.progress()["state"]["interrupted"] is False  # a new generation clears it, as in A1111


def test_progress_board_reports_the_latest_preview_as_current_image():
    clock = FakeClock()
    board = ProgressBoard(clock)
    key, gen = board.begin("txt2img")
    gen.step, gen.steps = 3, 10
    assert board.progress()["current_image"] is None  # no preview yet
    gen.current_image = "first-preview"
    clock.now += 1
    later_key, later = board.begin("txt2img")
    later.current_image = "other-generation"
    assert board.progress()["current_image"] == "first-preview"  # the reported (oldest) generation's preview
    gen.current_image = "second-preview"
    assert board.progress()["current_image"] == "second-preview"  # the latest one
    assert board.progress(skip_current_image=True)["current_image"] is None  # A1111's skip_current_image
    board.end(key)
    assert board.progress()["current_image"] == "other-generation"
    board.end(later_key)
    assert board.progress()["current_image"] is None  # nothing running


def test_the_mapping_needs_neither_fastapi_nor_ray():
    from tests.import_probe import heavy_imports

    assert heavy_imports(["serving.a1111", "serving.a1111_progress"],
                         ("fastapi", "starlette", "ray", "torch", "PIL")) == []


def test_every_sdserve_scheduler_has_an_a1111_name():
    # A model's default scheduler is reported as an A1111 sampler (+ schedule type) and maps back to itself.
    for key in SCHEDULERS:
        name, label, ours = resolve_sampler(None, None, key)
        assert name in {s.name for s in SAMPLERS}, key
        assert resolve_sampler(name, label, "euler")[2] == key
