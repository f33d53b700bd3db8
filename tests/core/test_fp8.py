"""FP8 linears (dynamic per-row and static calibrated scales). torch's CPU `_scaled_mm` runs the same FP8 math, so
the layers and the engine's calibration are checked here; the speed is measured on the H100 (docs/benchmarks.md)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from core import fp8
from core.config import EngineConfig
from core.engine import Engine
from core.schemas import GenerationRequest


def relative_error(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("static", [False, True])
def test_fp8_linear_matches_the_16_bit_layer_closely(static):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = fp8._make_fp8_linear()(linear, static=static)
    x = torch.randn(2, 10, 64)
    if static:
        assert torch.all(layer.input_amax == 0)
        with torch.no_grad():
            layer.calibrating = True
            calibrated = layer(x)  # the calibration pass computes in full precision
            layer.freeze_calibration()
        assert relative_error(calibrated, linear(x)) < 0.05
        assert float(layer.input_amax) == pytest.approx(float(x.abs().max()))
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (2, 10, 48) and out.dtype == x.dtype
    assert 0 < relative_error(out, linear(x)) < 0.1  # FP8 moves the result a little, never far


def test_static_scales_saturate_instead_of_overflowing():
    layer = fp8._make_fp8_linear()(torch.nn.Linear(32, 16), static=True)
    with torch.no_grad():
        layer.calibrating = True
        layer(torch.randn(4, 32))
        layer.freeze_calibration()
        out = layer(torch.randn(4, 32) * 1e4)  # far past the calibrated range
    assert torch.isfinite(out).all()


def test_engine_calibrates_static_fp8_at_load_and_stays_deterministic(monkeypatch, sdserve_cache_dir):
    monkeypatch.setattr(fp8, "fp8_supported", lambda device: True)  # CPU _scaled_mm stands in for the GPU's
    engine = Engine(EngineConfig(name="tiny", cache_dir=sdserve_cache_dir,
                                 optimization={"fp8": "static", "warmup_steps": 1})).load()
    layers = fp8.static_layers(engine.pipe.unet)
    assert engine.applied["fp8"] == "static" and engine.applied["fp8_layers"] == len(layers) > 0
    assert all(float(layer.input_amax) > 0 and not layer.calibrating for layer in layers)
    req = GenerationRequest(prompt="a fox", steps=3, seed=11, width=64, height=64)
    first, second = (engine.generate([req])[0].images[0].data for _ in range(2))
    assert first == second
    with Image.open(io.BytesIO(first)) as img:
        assert img.size == (64, 64) and np.asarray(img).std() > 0
