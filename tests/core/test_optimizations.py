"""core/optimizations.py: presigned attention processors (the host cost of diffusers' per-call inspect.signature)."""
from __future__ import annotations

import inspect
import logging
import pickle

import pytest


def _attention_processors(unet):
    from diffusers.models.attention_processor import Attention

    return [m.processor for m in unet.modules() if isinstance(m, Attention)]


def _unet_inputs(unet):
    import torch

    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, unet.config.in_channels, 8, 8, generator=g), torch.tensor([500.0, 20.0]),
            torch.randn(2, 7, unet.config.cross_attention_dim, generator=g))


@pytest.fixture()
def tiny_unet():
    from core.embedded import build_pipeline

    return build_pipeline("tiny-sd").unet.eval()


def _presigned(p) -> bool:
    return "__signature__" in vars(type(p).__call__)


def test_an_eager_engine_presigns_every_attention_processor(engine):
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs = _attention_processors(engine.pipe.unet)
    assert procs and all(_presigned(p) and isinstance(p, AttnProcessor2_0) for p in procs)
    for p in procs:  # what diffusers' Attention.forward reads: the bound __call__'s parameters, `self` left out
        assert inspect.signature(p.__call__) == inspect.signature(AttnProcessor2_0.__call__.__get__(p))
    assert not _presigned(AttnProcessor2_0())  # diffusers' own class is unchanged


def test_presigned_unet_gives_the_same_output_and_still_drops_unknown_kwargs(tiny_unet, caplog):
    import torch

    from core.optimizations import presign_attention_processors

    lat, t, hidden = _unet_inputs(tiny_unet)
    with torch.no_grad():
        before = tiny_unet(lat, t, encoder_hidden_states=hidden, return_dict=False)[0]
        assert presign_attention_processors(tiny_unet) >= 1
        assert presign_attention_processors(tiny_unet) == 0  # once per processor
        after = tiny_unet(lat, t, encoder_hidden_states=hidden, return_dict=False)[0]
        # a kwarg the processor does not take is still dropped with diffusers' warning (not passed on: no TypeError)
        library = logging.getLogger("diffusers")  # (its records do not propagate to the root logger, and an
        level = library.level  # engine's load turns its warnings off)
        library.addHandler(caplog.handler)
        library.setLevel(logging.WARNING)
        try:
            extra = tiny_unet(lat, t, encoder_hidden_states=hidden, cross_attention_kwargs={"bogus": 1},
                              return_dict=False)[0]
        finally:
            library.removeHandler(caplog.handler)
            library.setLevel(level)
    assert torch.equal(before, after) and torch.equal(before, extra)
    assert "['bogus'] are not expected" in caplog.text


def test_a_presigned_unet_pickles_and_compiles(tiny_unet):
    import torch

    from core.optimizations import presign_attention_processors

    presign_attention_processors(tiny_unet)
    copy = pickle.loads(pickle.dumps(tiny_unet))
    assert all(_presigned(p) for p in _attention_processors(copy))
    lat, t, hidden = _unet_inputs(tiny_unet)
    with torch.no_grad():
        want = tiny_unet(lat, t, encoder_hidden_states=hidden, return_dict=False)[0]
        assert torch.equal(want, copy(lat, t, encoder_hidden_states=hidden, return_dict=False)[0])
        # compiling after the engine's load (tests and benchmarks do) traces the presigned processors in one graph
        compiled = torch.compile(tiny_unet, backend="eager", fullgraph=True)
        assert torch.equal(want, compiled(lat, t, encoder_hidden_states=hidden, return_dict=False)[0])
