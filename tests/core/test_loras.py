"""LoRAs per request on the tiny CPU model, with LoRAs written by PEFT (tests/core/lora_files.py) in both layouts.

The reference is independent of the engine's LoRA code: the same deltas merged into a second engine's weights."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from core.schemas import GenerationError, GenerationRequest
from tests.core import lora_files as lf
from tests.core.conftest import _decode, _ok

TOL = 2  # CPU fp32: within 2/255


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def engine(make_config, lora_dir):
    from core.engine import Engine

    return Engine(make_config(limits={"max_batch_size": 4}, loras={"uri": str(lora_dir)})).load()


@pytest.fixture(scope="module")
def reference(make_config):
    """A plain engine (no LoRA library): LoRAs are merged into its weights and restored after each use."""
    from core.engine import Engine

    # no prompt-embedding cache: the text encoder's weights change under it
    eng = Engine(make_config(limits={"max_batch_size": 4}, caches={"prompt_embeddings_mb": 0})).load()
    eng.saved = lf.snapshot(eng.pipe)
    return eng


@pytest.fixture(scope="module")
def loras(engine, lora_dir):
    """style: UNet + text encoder, diffusers layout, alpha 2 of rank 4 (scale 0.5); kstyle: the same in kohya
    layout; ink: another UNet-only LoRA (kohya, no alpha)."""
    pipe = engine.pipe
    style = {"unet": lf.peft_lora(pipe.unet, lf.UNET_ATTENTION, seed=0),
             "text_encoder": lf.peft_lora(pipe.text_encoder, lf.TEXT, seed=1)}
    ink = {"unet": lf.peft_lora(pipe.unet, lf.UNET_ATTENTION, seed=2)}
    lf.save_diffusers(lora_dir / "style.safetensors", style, alpha=2,
                      metadata={"ss_tag_frequency": '{"set": {"watercolor": 9, "paper": 3}}'})
    lf.save_kohya(lora_dir / "kstyle.safetensors", style, alpha=2,
                  metadata={"modelspec.trigger_phrase": "kstyle art"})
    lf.save_kohya(lora_dir / "sub" / "ink.safetensors", ink)
    return {"style": (style, 0.5), "ink": (ink, 1.0)}


def req(**kw) -> GenerationRequest:
    kw.setdefault("prompt", "a red fox in the snow")
    kw.setdefault("steps", 2)
    kw.setdefault("seed", 7)
    return GenerationRequest(**kw)


def image(outcome) -> np.ndarray:
    return _decode(_ok(outcome).images[0].data)


def merged_image(reference, loras, used: list[tuple[str, float]], request: GenerationRequest) -> np.ndarray:
    try:
        for name, weight in used:
            parts, scale = loras[name]
            lf.merge_into(reference.pipe, parts, weight, scale)
        return image(reference.generate([request])[0])
    finally:
        lf.restore(reference.pipe, reference.saved)


def test_library_lists_layouts_ranks_and_trigger_words(engine, loras):
    listed = {e["name"]: e for e in engine.loras()}
    assert set(listed) == {"style", "kstyle", "sub/ink"}
    assert listed["style"]["layout"] == "diffusers" and listed["kstyle"]["layout"] == "kohya"
    assert listed["style"]["rank"] == 4 and listed["style"]["size_bytes"] > 0
    assert listed["style"]["components"] == ["text_encoder", "unet"]
    assert listed["sub/ink"]["components"] == ["unet"]
    assert listed["style"]["trigger_words"] == ["watercolor", "paper"]
    assert listed["kstyle"]["trigger_words"] == ["kstyle art"]


@pytest.mark.parametrize("name", ["style", "kstyle"])
def test_lora_equals_its_weights_merged_into_the_model(engine, reference, loras, name):
    """Both layouts, UNet + text encoder, alpha/rank scale and the request weight, against merged weights."""
    got = image(engine.generate([req(loras=[{"name": name, "weight": 0.8}])])[0])
    want = merged_image(reference, loras, [("style", 0.8)], req())
    assert np.abs(got - want).max() <= TOL


def test_weight_zero_equals_no_lora_and_the_image_changes_with_weight(engine, loras):
    base = image(engine.generate([req()])[0])
    zero = image(engine.generate([req(loras=[{"name": "style", "weight": 0.0}])])[0])
    half, full = (image(engine.generate([req(loras=[{"name": "style", "weight": w}])])[0]) for w in (0.5, 1.5))
    assert np.array_equal(zero, base)
    assert np.abs(half - base).max() > 10 and np.abs(full - half).max() > 10


def test_two_loras_compose(engine, reference, loras):
    used = [("style", 0.7), ("ink", -0.6)]
    got = image(engine.generate([req(loras=[{"name": "style", "weight": 0.7},
                                            {"name": "sub/ink", "weight": -0.6}])])[0])
    want = merged_image(reference, loras, used, req())
    assert np.abs(got - want).max() <= TOL


def test_prompt_syntax_equals_the_field(engine, loras):
    field = _ok(engine.generate([req(prompt="a red fox, in the snow", loras=[{"name": "style", "weight": 0.8}])])[0])
    tagged = _ok(engine.generate([req(prompt="a red fox, <lora:style:0.8> in the snow")])[0])
    assert np.array_equal(_decode(field.images[0].data), _decode(tagged.images[0].data))
    resolved = engine.resolve(req(prompt="a red fox <lora:style:0.5> <lora:sub/ink>", loras=[{"name": "style"}]))
    assert resolved.prompt == "a red fox"
    assert [(r.name, r.weight) for r in resolved.loras] == [("style", 1.5), ("sub/ink", 1.0)]


def test_mixed_adapter_batch_equals_each_alone(engine, loras):
    """Four requests with four different adapter sets share ONE UNet call per step; each image equals its own
    run alone."""
    sets = [[], [{"name": "style", "weight": 0.9}], [{"name": "sub/ink", "weight": 1.2}],
            [{"name": "kstyle", "weight": -0.5}, {"name": "sub/ink", "weight": 0.4}]]
    requests = [req(seed=10 + i, loras=s) for i, s in enumerate(sets)]
    together = engine.generate(requests)
    assert [_ok(o).batch_size for o in together] == [4, 4, 4, 4]
    for request, outcome in zip(requests, together):
        alone = engine.generate([request])[0]
        assert _ok(alone).batch_size == 1
        assert np.abs(image(outcome) - image(alone)).max() <= TOL


def test_more_adapter_sets_than_gpu_slots_wait_for_a_later_call(engine, loras):
    slots = engine.lora.cfg.gpu_slots
    engine.lora.cfg.gpu_slots = 2
    try:
        sets = [[{"name": "style", "weight": w}] for w in (0.3, 0.6, 0.9)]
        outs = engine.generate([req(seed=i, loras=s) for i, s in enumerate(sets)])
        assert max(_ok(o).batch_size for o in outs) == 2
    finally:
        engine.lora.cfg.gpu_slots = slots


def test_unknown_lora_is_a_validation_error_listing_what_exists(engine, loras):
    out = engine.generate([req(loras=[{"name": "style"}, {"name": "nope"}])])[0]
    assert isinstance(out, GenerationError) and out.kind == "validation" and out.field == "loras.1.name"
    assert "nope" in out.message and "kstyle, style, sub/ink" in out.message
    tagged = engine.generate([req(prompt="a fox <lora:missing:1>")])[0]
    assert tagged.field == "loras.0.name"
    bad_weight = engine.generate([req(prompt="a fox <lora:style:lots>")])[0]
    assert bad_weight.field == "prompt" and "number" in bad_weight.message


def test_wrong_base_family_is_a_validation_error(engine, lora_dir, loras, make_config):
    """An SDXL LoRA (by its metadata) on the SD1.5-family model: refused by name; a LoRA whose layers do not fit
    (made on tiny-sdxl, no metadata) is refused when it is loaded."""
    from core.embedded import build_pipeline

    xl = build_pipeline("tiny-sdxl")
    xl_parts = {"unet": lf.peft_lora(xl.unet, lf.UNET_ATTENTION)}
    lf.save_kohya(lora_dir / "xl_meta.safetensors", xl_parts, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    lf.save_diffusers(lora_dir / "xl_plain.safetensors", xl_parts)
    try:
        out = engine.generate([req(loras=[{"name": "xl_meta"}])])[0]
        assert out.kind == "validation" and out.field == "loras.0.name"
        assert "is for sdxl" in out.message and "tiny-sd is sd15" in out.message
        plain = engine.generate([req(loras=[{"name": "xl_plain"}])])[0]
        assert plain.kind == "validation" and plain.field == "loras" and "cannot apply" in plain.message
    finally:
        for name in ("xl_meta", "xl_plain"):
            (lora_dir / f"{name}.safetensors").unlink()


def test_a_file_dropped_into_the_folder_is_listed_and_usable(engine, lora_dir, loras):
    parts = {"unet": lf.peft_lora(engine.pipe.unet, ["to_q", "to_v"], seed=5)}
    assert "fresh" not in {e["name"] for e in engine.loras()}
    lf.save_diffusers(lora_dir / "fresh.safetensors", parts)
    try:
        assert "fresh" in {e["name"] for e in engine.loras()}
        base = image(engine.generate([req()])[0])
        assert np.abs(image(engine.generate([req(loras=[{"name": "fresh"}])])[0]) - base).max() > 0
    finally:
        (lora_dir / "fresh.safetensors").unlink()


def test_eviction_gives_host_memory_back(engine, loras):
    cache = engine.lora.cache
    _ok(engine.generate([req(loras=[{"name": "style"}, {"name": "sub/ink"}])])[0])
    held = cache.bytes_held
    assert {"style", "sub/ink"} <= set(cache.resident()) and held > 0
    assert cache.evict("style")
    assert cache.bytes_held < held and "style" not in cache.resident()
    budget = cache.budget
    cache.budget = 1  # over budget: loading keeps only the newest
    try:
        _ok(engine.generate([req(loras=[{"name": "kstyle"}])])[0])
        assert cache.resident() == ["kstyle"]
    finally:
        cache.budget = budget
    _ok(engine.generate([req(loras=[{"name": "style"}])])[0])  # evicted adapters load again


def test_loading_does_not_block_other_requests(engine, loras, monkeypatch):
    """While one request's LoRA is being read (held here), a plain request runs to completion."""
    engine.lora.cache.evict("sub/ink")
    release, reading = threading.Event(), threading.Event()
    read = engine.lora.library.read

    def slow_read(info):
        reading.set()
        assert release.wait(60)
        return read(info)

    monkeypatch.setattr(engine.lora.library, "read", slow_read)
    job = engine.submit(req(loras=[{"name": "sub/ink"}]))
    assert reading.wait(60)
    _ok(engine.generate([req(seed=3)])[0])
    assert not job.future.done()
    release.set()
    _ok(job.future.result(timeout=60))


def test_no_library_refuses_loras(reference):
    out = reference.generate([req(loras=[{"name": "style"}])])[0]
    assert out.kind == "validation" and out.field == "loras" and "no LoRA library" in out.message


def test_request_schema_bounds_loras():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="loras.0.weight"):
        req(loras=[{"name": "a", "weight": 5}])
    with pytest.raises(ValidationError, match="loras"):
        req(loras=[{"name": f"a{i}"} for i in range(9)])
    with pytest.raises(ValidationError, match="loras.0.extra"):
        req(loras=[{"name": "a", "extra": 1}])
    with pytest.raises(ValidationError, match="loras.0.name"):
        req(loras=[{"name": "a:b"}])


def test_conv_loras_per_sample_with_all_targets(make_config, reference, tmp_path):
    """targets: all - a LoCon-style LoRA on resnet 3x3/1x1 convs equals its merged weights, also when mixed in
    one call with a request without it (per-sample grouped conv)."""
    from core.engine import Engine

    eng = Engine(make_config(limits={"max_batch_size": 2}, loras={"uri": str(tmp_path), "targets": "all"})).load()
    parts = {"unet": lf.peft_lora(eng.pipe.unet, ["conv1", "conv2", "conv_shortcut", "to_k", "time_emb_proj"],
                                  seed=4, std=0.2)}
    lf.save_kohya(tmp_path / "locon.safetensors", parts, alpha=2)
    loras = {"locon": (parts, 0.5)}
    with_lora, without = req(seed=1, loras=[{"name": "locon", "weight": 1.2}]), req(seed=2)
    _ok(eng.generate([with_lora])[0])  # loads it: requests whose LoRAs are resident start together
    together = eng.generate([with_lora, without])
    assert [_ok(o).batch_size for o in together] == [2, 2]
    want = merged_image(reference, loras, [("locon", 1.2)], with_lora.model_copy(update={"loras": []}))
    assert np.abs(image(together[0]) - want).max() <= TOL
    assert np.abs(image(together[1]) - image(reference.generate([without])[0])).max() <= TOL


def test_prompt_tags_parse_like_a1111():
    from core.prompt_syntax import extract_loras, merge_loras

    assert extract_loras("a <lora:x:0.8> fox, <LORA:y>, <lora:z:0.5:0.2>") == (
        "a fox", [("x", 0.8), ("y", 1.0), ("z", 0.5)])
    assert extract_loras("red, <lora:x>, fox")[0] == "red, fox"
    assert extract_loras("no tags <here>") == ("no tags <here>", [])
    with pytest.raises(ValueError, match="number"):
        extract_loras("<lora:x:abc>")
    assert merge_loras([("x", 0.5)], [("x", 0.25), ("y", -1.0)]) == [("x", 0.75), ("y", -1.0)]


def test_lora_folder_from_the_environment(monkeypatch, tmp_path):
    from core.config import LoraConfig

    monkeypatch.setenv("SDSERVE_LORA_DIR", str(tmp_path))
    assert LoraConfig(uri="${SDSERVE_LORA_DIR:-./loras}").uri == str(tmp_path)
    monkeypatch.delenv("SDSERVE_LORA_DIR")
    monkeypatch.chdir(tmp_path)
    assert LoraConfig(uri="${SDSERVE_LORA_DIR:-./loras}").uri == str(tmp_path / "loras")
    assert LoraConfig(uri="s3://bucket/loras").uri == "s3://bucket/loras"


def test_same_field_in_parquet_rows_and_the_openai_extension():
    from batch_jobs.config import RowDefaults
    from batch_jobs.rows import to_request
    from serving.openai_api import OpenAIImageRequest, to_generation_request

    row = {"id": 1, "prompt": "a fox", "loras": [{"name": "style", "weight": 0.5}]}
    assert to_request(row, RowDefaults(), 0).loras[0].weight == 0.5
    with pytest.raises(GenerationError) as err:
        to_request(dict(row, loras=[{"name": "style", "weight": 9.0}]), RowDefaults(), 0)
    assert err.value.field == "loras" and "loras.0.weight" in err.value.message
    body = OpenAIImageRequest(prompt="a fox", loras=[{"name": "style", "weight": -1}])
    assert to_generation_request(body).loras[0].name == "style"


@pytest.mark.parametrize("meta, keys, want", [
    ({"ss_base_model_version": "sdxl_base_v1-0"}, {}, "sdxl"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, {}, "sd15"),
    ({"ss_base_model_version": "sd_v2_768_v"}, {}, "sd21"),
    ({"ss_sd_model_name": "dreamshaper_v2_xl_fake"}, {}, "unknown"),  # a checkpoint's name says nothing
    ({}, {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": [4, 1280]}, "sdxl"),
    ({}, {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": [4, 768]},
     "sd15"),
    ({}, {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": [8, 2048]}, "sdxl"),
])
def test_base_family_from_metadata_keys_or_shapes(meta, keys, want):
    from core.lora_library import family_of, layout_of

    header = {"__metadata__": meta, **{k: {"shape": v} for k, v in keys.items()}}
    names = list(keys) or ["lora_unet_x.lora_down.weight"]
    assert family_of(header, names, layout_of(names)) == want
