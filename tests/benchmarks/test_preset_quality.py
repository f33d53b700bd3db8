"""benchmarks/preset_quality.py on CPU (tiny model, compile off): exact is its own reference; fastest's step caching
moves the pixels (finite PSNR, SSIM < 1); the SSIM/PSNR figures behave as the metrics should."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.preset_quality import psnr, ssim


def test_ssim_and_psnr_rank_small_and_large_differences():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    near = np.clip(img.astype(int) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
    far = rng.integers(0, 256, img.shape, dtype=np.uint8)
    assert ssim(img, img) == 1.0 and psnr(img, img) is None
    assert 1.0 > ssim(img, near) > 0.9 > ssim(img, far)
    assert psnr(img, near) > 35 > psnr(img, far)


@pytest.mark.slow  # two fresh processes (torch import each): 20-70 s on the shared 2-core box
def test_presets_are_compared_with_exact_on_the_same_seeds(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.preset_quality", "--workload", "tiny-64-4", "--device", "cpu",
                    "--presets", "fastest", "--prompts", "2", "--repeats", "1", "--override", '{"compile": "none"}',
                    "--workdir", str(tmp_path / "work"), "--out", str(tmp_path)], check=True, capture_output=True,
                   text=True, timeout=600)
    report = json.loads((tmp_path / "preset-quality-tiny-64-4.json").read_text())
    exact, fastest = report["runs"]
    assert exact["preset"] == "exact" and fastest["preset"] == "fastest"
    assert exact["quality_vs_exact"] == {"psnr_db": None, "psnr_db_min": None, "identical_images": 2, "ssim": 1.0,
                                         "ssim_min": 1.0}
    assert fastest["optimization"]["step_cache"] == {"interval": 3, "first_full_steps": 1}
    assert fastest["optimization"]["compile"] == "none"  # the override beats the preset
    q = fastest["quality_vs_exact"]
    assert q["identical_images"] == 0 and q["psnr_db"] > 0 and q["ssim"] < 1.0
    assert fastest["latency_s"] > 0 and fastest["speed_vs_exact"] > 0
