"""Warm-up at load: the configured shapes run once, through the normal generate path."""
from __future__ import annotations

import pytest

from core.engine import Engine


def test_warmup_runs_configured_shapes(make_config, req, ok):
    eng = Engine(make_config(optimization={"warmup_steps": 1, "warmup_shapes": [(64, 72, 2)]})).load()
    assert eng.warmup_s > 0 and eng.load_s > 0
    ok(eng.generate([req(seed=1)])[0])
    assert eng.info()["family"] == "sd15" and eng.info()["device"] == "cpu"


def test_warmup_batch_above_images_per_request_limit(make_config):
    cfg = make_config(limits={"max_batch_size": 16, "max_images_per_request": 8},
                      optimization={"warmup_steps": 1, "warmup_shapes": [(64, 64, 12)]})
    Engine(cfg).load()
