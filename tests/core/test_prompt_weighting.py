"""Opt-in prompt weighting and long prompts (compel) on the tiny CPU models: A1111 emphasis is translated, weights
change the image, a prompt beyond 77 tokens is read in full, and weighted/unweighted prompts of any length share
UNet calls (one padded sequence length)."""
from __future__ import annotations

import numpy as np
import pytest

from core.prompt_weighting import a1111_to_compel, parse_a1111
from core.schemas import GenerationError, GenerationRequest


def test_a1111_emphasis_parses_like_a1111():
    assert parse_a1111("a (red:1.5) fox") == [("a ", 1.0), ("red", 1.5), (" fox", 1.0)]
    got = dict(parse_a1111("((cat)) [dog] \\(literal\\)"))
    assert got["cat"] == pytest.approx(1.21) and got["dog"] == pytest.approx(1 / 1.1)
    assert got[" (literal)"] == 1.0
    assert a1111_to_compel("a (red:1.5) fox") == "a (red)1.5  fox"


def _image(outcome):
    import io

    from PIL import Image

    if isinstance(outcome, GenerationError):
        pytest.fail(outcome.message)
    with Image.open(io.BytesIO(outcome.images[0].data)) as img:
        return np.asarray(img.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module", params=["tiny-sd", "tiny-sdxl"])
def engines(request, make_config):
    from core.engine import Engine

    source = f"embedded:{request.param}"
    plain = Engine(make_config(name=request.param, source=source)).load()
    weighted = Engine(make_config(name=request.param, source=source, prompt_weighting=True, prompt_chunks=2,
                                  limits={"max_batch_size": 4})).load()
    one_chunk = Engine(make_config(name=request.param, source=source, prompt_weighting=True, prompt_chunks=1)).load()
    return plain, weighted, one_chunk


def req(prompt: str, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, steps=2, seed=5, **kw)


def test_weighting_changes_images_and_plain_prompts_match_the_pipeline(engines):
    plain, weighted, one_chunk = engines
    same = np.abs(_image(one_chunk.generate([req("a red fox")])[0]) - _image(plain.generate([req("a red fox")])[0]))
    assert same.max() <= 2  # unweighted, one chunk: the pipeline's own encoding
    base = _image(weighted.generate([req("a red fox")])[0])
    strong = _image(weighted.generate([req("a (red:1.8) fox")])[0])
    assert np.abs(strong - base).max() > 0


def test_long_prompts_are_read_beyond_77_tokens_and_still_share_calls(engines):
    plain, weighted, _ = engines
    head = "a red fox in the snow, " * 5  # ~100 byte-level tokens on the tiny tokenizer (2 chunks: 150)
    a, b = req(head + "at night"), req(head + "at noon, sunny")
    assert np.array_equal(_image(plain.generate([a])[0]), _image(plain.generate([b])[0]))  # cut at 77 tokens
    outs = weighted.generate([a, b, req("short (prompt:1.2)")])
    assert [o.batch_size for o in outs] == [3, 3, 3]
    assert np.abs(_image(outs[0]) - _image(outs[1])).max() > 0  # the tail is read
    alone = weighted.generate([a])[0]
    assert np.abs(_image(alone) - _image(outs[0])).max() <= 2
