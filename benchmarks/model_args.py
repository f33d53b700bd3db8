"""The model/size/steps options that the single-engine benchmark CLIs (lora_bench, preview_cost) share."""
from __future__ import annotations

import argparse

MODELS = ["tiny-sd", "tiny-sdxl", "sd15", "sdxl"]
DEFAULT_SIDE = {"sdxl": 1024, "sd15": 512}  # tiny models: 64


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="sdxl", choices=MODELS)
    p.add_argument("--width", type=int, default=None, help="default: 1024 (sdxl), 512 (sd15), 64 (tiny)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--steps", type=int, default=30)


def output_size(a: argparse.Namespace) -> tuple[int, int]:
    """(width, height): the options given, else the model's default side."""
    side = DEFAULT_SIDE.get(a.model, 64)
    return a.width or side, a.height or side
