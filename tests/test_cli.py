"""`sdserve generate`: writes images, same seed -> same bytes, bad input -> exit code 2 naming the field."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdserve.cli import main

FAST = ["--steps", "2", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _cache(sdserve_cache_dir):
    """EngineConfig's default cache dir comes from SDSERVE_CACHE_DIR (set by the session fixture)."""


def generate(tmp_path, *args, name="out.png") -> tuple[int, Path]:
    out = tmp_path / name
    return main(["generate", "a fox in the snow", "-o", str(out), *FAST, *args]), out


def test_writes_png_and_reports_seed(tmp_path, capsys):
    rc, out = generate(tmp_path, "--seed", "7")
    assert rc == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (64, 64)
        assert "Seed: 7" in img.text["parameters"]
    stdout = capsys.readouterr().out
    assert "seed=7" in stdout and "noise" in stdout  # embedded model: says its images are noise


def test_same_seed_same_bytes(tmp_path):
    rc1, a = generate(tmp_path, "--seed", "11", name="a.png")
    rc2, b = generate(tmp_path, "--seed", "11", name="b.png")
    assert rc1 == rc2 == 0 and a.read_bytes() == b.read_bytes()


def test_options_reach_the_request(tmp_path):
    rc, out = generate(tmp_path, "--seed", "3", "--width", "96", "--height", "72", "--scheduler", "euler_a",
                       "--guidance-scale", "3", "--negative-prompt", "blur", "--output-format", "jpeg", name="o.jpg")
    assert rc == 0
    with Image.open(out) as img:
        assert img.format == "JPEG" and img.size == (96, 72)


def test_several_images_numbered_next_to_output(tmp_path):
    folder = tmp_path / "run.d"  # a dot in the folder name must not be mistaken for the extension
    folder.mkdir()
    rc, _ = generate(folder, "--seed", "5", "--num-images", "2", name="fox.png")
    assert rc == 0
    assert sorted(p.name for p in folder.iterdir()) == ["fox-0.png", "fox-1.png"]


@pytest.mark.parametrize("args, field", [
    (["--width", "65"], "width"),
    (["--steps", "0"], "steps"),
    (["--seed", "-1"], "seed"),
    (["--num-images", "0"], "num_images"),
    (["--scheduler", "warp"], "scheduler"),
])
def test_bad_request_exit_2_names_field(tmp_path, capsys, args, field):
    rc, out = generate(tmp_path, *args)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {field}:"), err
    assert not out.exists()


def test_blank_prompt(tmp_path, capsys):
    assert main(["generate", "  ", "-o", str(tmp_path / "x.png"), *FAST]) == 2
    assert capsys.readouterr().err.startswith("error: prompt:")


def test_bad_config_key_exit_2_names_key(tmp_path, capsys):
    cfg = tmp_path / "engine.yaml"
    cfg.write_text("engine:\n  limits:\n    max_stepz: 5\n")
    rc, _ = generate(tmp_path, "--config", str(cfg))
    assert rc == 2 and "limits.max_stepz" in capsys.readouterr().err


def test_model_limit_exit_2_names_field(tmp_path, capsys):
    cfg = tmp_path / "engine.yaml"
    cfg.write_text("limits:\n  max_width: 128\noptimization:\n  warmup_steps: 0\n")
    rc, out = generate(tmp_path, "--config", str(cfg), "--width", "256")
    assert rc == 2 and "width" in capsys.readouterr().err and not out.exists()


def test_console_script_matches_in_process(tmp_path):
    exe = shutil.which("sdserve", path=os.path.dirname(sys.executable)) or shutil.which("sdserve")
    if exe is None:
        pytest.skip("sdserve console script not installed")
    sub = tmp_path / "sub.png"
    # the console script runs while the in-process one generates (it mostly imports torch meanwhile)
    proc = subprocess.Popen([exe, "generate", "a fox in the snow", "-o", str(sub), "--seed", "13", *FAST],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        rc, here = generate(tmp_path, "--seed", "13", name="here.png")
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert rc == 0 and sub.read_bytes() == here.read_bytes()
    with Image.open(io.BytesIO(sub.read_bytes())) as img:
        assert img.size == (64, 64)


def test_console_script_bad_input_exit_2(tmp_path):
    exe = shutil.which("sdserve", path=os.path.dirname(sys.executable)) or shutil.which("sdserve")
    if exe is None:
        pytest.skip("sdserve console script not installed")
    proc = subprocess.run([exe, "generate", "a fox", "-o", str(tmp_path / "x.png"), "--height", "100"],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 2 and "height" in proc.stderr


@pytest.mark.parametrize("name", ["batch-tiny.yaml", "batch-sd15.yaml"])
def test_check_validates_the_shipped_batch_configs(name, capsys):
    path = Path(__file__).resolve().parents[1] / "configs" / name
    assert main(["check", str(path)]) == 0
    assert "ok: batch job config" in capsys.readouterr().out


def test_check_names_the_bad_key_of_a_batch_config(tmp_path, capsys):
    bad = tmp_path / "batch.yaml"
    bad.write_text('engine: {name: x, source: "embedded:tiny-sd", device: cpu}\nbatch_size: 0\n')
    assert main(["check", str(bad)]) == 2
    assert "batch_size: Input should be greater than or equal to 1" in capsys.readouterr().err
