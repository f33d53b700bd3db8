"""benchmarks/preview_cost.py on the embedded tiny model (CPU): every variant timed, previews counted and split."""
from __future__ import annotations

import json

from benchmarks.preview_cost import main


def test_preview_cost_reports_each_variant(tmp_path, capsys, sdserve_cache_dir, monkeypatch):
    monkeypatch.setenv("SDSERVE_CACHE_DIR", sdserve_cache_dir)
    out = tmp_path / "r.json"
    assert main(["--model", "tiny-sd", "--steps", "4", "--batch", "2", "--every", "2", "--rounds", "1",
                 "--variants", "none,latent2rgb,taesd", "--device", "cpu", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["previews_per_call"] == 1 and report["family"] == "sd15"  # step 2 of 4 (never the last)
    assert set(report["variants"]) == {"none", "latent2rgb", "taesd"}
    assert report["variants"]["none"]["overhead_pct"] == 0.0 and "preview_rgb_ms" not in report["variants"]["none"]
    for v in ("latent2rgb", "taesd"):
        assert report["variants"][v]["preview_rgb_ms"] > 0 and report["variants"][v]["preview_jpeg_ms"] > 0
