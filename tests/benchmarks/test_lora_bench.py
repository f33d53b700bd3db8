"""benchmarks/lora_bench.py on the embedded tiny model (CPU): every measurement present and plausible."""
from __future__ import annotations

import json

from benchmarks.lora_bench import main


def test_lora_bench_reports_latency_switch_and_mixed_batches(tmp_path, capsys, sdserve_cache_dir, monkeypatch):
    monkeypatch.setenv("SDSERVE_CACHE_DIR", sdserve_cache_dir)
    out = tmp_path / "r.json"
    assert main(["--model", "tiny-sd", "--steps", "2", "--rank", "4", "--rounds", "1", "--device", "cpu",
                 "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert set(report["latency_s"]) == {"0", "1", "3"} and all(v > 0 for v in report["latency_s"].values())
    assert set(report["switch_ms"]) == {"disk", "host", "gpu"}
    assert report["switch_ms"]["disk"] > report["switch_ms"]["gpu"]  # a disk read costs more than a slot hit
    assert set(report["images_per_s"]) == {"mixed", "grouped", "sequential", "shared", "mixed_vs_shared"}
    assert report["lora_file_bytes"] > 0 and report["recompiles"] == 0
