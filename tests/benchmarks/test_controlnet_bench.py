"""benchmarks/controlnet_bench.py on CPU with the tiny model: every variant is measured and the ratios are made."""
from __future__ import annotations

import json

from benchmarks.controlnet_bench import main


def test_controlnet_bench_records_every_variant(tmp_path):
    assert main(["--model", "tiny-sd", "--size", "64", "--steps", "2", "--device", "cpu", "--repeats", "1",
                 "--levels", "none", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-controlnet.json")
    report = json.loads(path.read_text())
    assert report["bench"] == "controlnet" and not [r for r in report["records"] if "error" in r]
    got = {(r["variant"], r["task"]) for r in report["records"]}
    assert got == {("diffusers", "controlnet"), ("sdserve-none", "txt2img"), ("sdserve-none", "controlnet"),
                   ("sdserve-none", "img2img-0.6")}
    by = {(r["variant"], r["task"]): r for r in report["records"]}
    assert by[("sdserve-none", "controlnet")]["vs_diffusers"] > 0 and by[("sdserve-none", "img2img-0.6")]["vs_txt2img"] > 0
