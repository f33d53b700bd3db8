"""Per-sample seeds: an image depends only on its own request, alone or inside a batch (every scheduler:
tests/core/test_step_scheduler.py)."""
from __future__ import annotations

import numpy as np

from core.batching import group_key
from core.schemas import MAX_SEED

MAX_DIFF = 2  # of 255: batched matmuls round differently from batch-1 ones on CPU fp32


def others(req, n=3, **kw):
    return [req(prompt=f"another prompt {i}", negative_prompt=f"neg {i}", seed=1000 + i, **kw) for i in range(n)]


def test_images_are_not_constant(engine, req, ok, decode):
    """Guards the equality tests below: different seeds give different, non-flat noise images."""
    a, b = (decode(ok(engine.generate([req(seed=s)])[0]).images[0].data) for s in (1, 2))
    assert a.std() > 5 and np.abs(a - b).max() > 20


def test_batch_members_differ(engine, req, ok, decode):
    outs = [ok(o) for o in engine.generate(others(req, 4))]
    pix = [decode(o.images[0].data) for o in outs]
    assert all(np.abs(pix[i] - pix[j]).max() > 20 for i in range(4) for j in range(i + 1, 4))


def test_same_seed_twice_gives_identical_bytes(engine, req, ok):
    a = ok(engine.generate([req(seed=77, scheduler="euler_a")])[0])
    b = ok(engine.generate([req(seed=77, scheduler="euler_a")])[0])
    assert a.images[0].data == b.images[0].data


def test_same_request_twice_in_one_batch(engine, req, ok, decode):
    outs = [ok(o) for o in engine.generate([req(seed=9), req(seed=9)])]
    assert outs[0].batch_size == 2
    # Not bit-exact: rows of one batched CPU matmul may be blocked (and so rounded) differently.
    assert np.abs(decode(outs[0].images[0].data) - decode(outs[1].images[0].data)).max() <= MAX_DIFF


def test_seed_absent_is_drawn_and_reported(engine, req, ok, decode):
    out = ok(engine.generate([req(num_images=3)])[0])
    seed = out.seed
    assert [im.seed for im in out.images] == [seed, (seed + 1) % (MAX_SEED + 1), (seed + 2) % (MAX_SEED + 1)]
    # Image i is exactly what seed+i gives: replay each one alone.
    for i, image in enumerate(out.images):
        replay = ok(engine.generate([req(seed=image.seed)])[0])
        assert np.abs(decode(replay.images[0].data) - decode(image.data)).max() <= MAX_DIFF, i


def test_seed_wraps_at_32_bits(engine, req, ok):
    out = ok(engine.generate([req(seed=MAX_SEED, num_images=2)])[0])
    assert [im.seed for im in out.images] == [MAX_SEED, 0]


def test_num_images_larger_than_max_batch_is_chunked(make_config, req, ok, decode):
    from core.engine import Engine

    eng = Engine(make_config(limits={"max_batch_size": 2})).load()
    out = ok(eng.generate([req(seed=300, num_images=5)])[0])
    assert len(out.images) == 5 and out.batch_size == 2
    assert [im.seed for im in out.images] == [300, 301, 302, 303, 304]
    single = ok(eng.generate([req(seed=303)])[0])
    assert np.abs(decode(single.images[0].data) - decode(out.images[3].data)).max() <= MAX_DIFF


def test_only_the_shape_splits_calls(engine, req, ok):
    """Guidance (CFG on or off), steps and scheduler share a call; another size runs in its own calls."""
    outs = [ok(o) for o in engine.generate([req(seed=1), req(seed=2, width=72), req(seed=3, guidance_scale=1.0),
                                            req(seed=4, steps=3, scheduler="ddim")])]
    assert [o.batch_size for o in outs] == [3, 1, 3, 3]
    assert outs[1].width == 72


def test_group_key_is_model_and_size(engine, req):
    base = engine.resolve(req(seed=1))
    for change in ({"width": 72}, {"height": 72}, {"model": "other"}):
        assert group_key(base) != group_key(base.model_copy(update=change)), change
    for same in ({"seed": 2}, {"prompt": "x"}, {"negative_prompt": "y"}, {"num_images": 3},
                 {"output_format": "jpeg"}, {"steps": 3}, {"scheduler": "ddim"}, {"guidance_scale": 1.0}):
        assert group_key(base) == group_key(base.model_copy(update=same)), same
