"""The GPU benchmark harness and cold-start benchmark run end to end on the CPU (tiny model), so a broken
harness shows up here and not after minutes of booked GPU time."""
from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

EAGER = '{"compile": "none", "sdpa_backend": "auto"}'


def bench(out, *args):
    subprocess.run([sys.executable, "-m", "benchmarks.gpu_bench", "--workloads", "tiny-64-4", "--repeats", "1",
                    "--no-flops", "--sdserve-settings", EAGER, "--out", str(out), *args], check=True,
                   capture_output=True, text=True, timeout=300)
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())["records"]


def test_gpu_bench_records_variants_profiles_and_quality_across_runs(tmp_path, sdserve_cache_dir):
    refs = tmp_path / "refs"
    first = bench(tmp_path / "a", "--batches", "1,2", "--variants", "diffusers-eager,sdserve", "--profile",
                  "--reference-dir", str(refs), "--cache-dir", sdserve_cache_dir)
    by = {(r["variant"], r["batch"]): r for r in first}
    assert set(by) == {("diffusers-eager", 1), ("diffusers-eager", 2), ("sdserve", 1), ("sdserve", 2)}
    for r in first:
        assert r["latency_s"] > 0 and r["img_per_s"] > 0 and r["device"] == "cpu"
    assert by[("sdserve", 2)]["profile"]["wall_s"] > 0 and by[("sdserve", 2)]["speedup_vs_diffusers-eager"] > 0
    assert (tmp_path / "a" / "profile-tiny-64-4-b2.txt").exists()
    kept = sorted(p.name for p in (refs / "tiny-64-4").iterdir())
    assert kept == ["b1-0.png", "b2-0.png", "b2-1.png"]
    with Image.open(refs / "tiny-64-4" / "b2-1.png") as img:
        assert img.size == (64, 64)

    # A later run of opt-in variants only: quality against the kept reference. The same settings under another
    # name must reproduce it exactly (identical pixels), step caching must move it.
    later = bench(tmp_path / "b", "--batches", "1,2", "--variants", "sdserve-deepcache", "--extra-sdserve",
                  '{"sdserve-again": {}}', "--reference-dir", str(refs), "--cache-dir", sdserve_cache_dir)
    q = {(r["variant"], r["batch"]): r["quality"] for r in later}
    assert q[("sdserve-again", 2)]["mean_abs_diff"] == 0 and q[("sdserve-again", 2)]["psnr_db"] is None
    assert q[("sdserve-deepcache", 2)]["mean_abs_diff"] > 0


def test_memory_levels_are_timed_again_in_turns_for_their_ratios(tmp_path, sdserve_cache_dir):
    recs = bench(tmp_path, "--batches", "1", "--variants", "none", "--memory-levels", "none,balanced:stream:0.3:fp8:3",
                 "--cache-dir", sdserve_cache_dir)
    none, balanced = recs
    assert (none["variant"], balanced["variant"]) == ("sdserve-none", "sdserve-balanced-stream-0.3-fp8-3")
    assert balanced["settings"]["streamed_share"] == 0.3 and balanced["settings"]["stream_lookahead"] == 3
    for r in recs:
        assert r["interleaved_rounds"] == 2 == len(r["interleaved_times_s"]) and r["interleaved_s"] > 0
    assert none["interleaved_vs_first"] == 1.0 and balanced["interleaved_vs_first"] > 0


def test_cold_start_benchmark_runs_from_nothing_local_caches_and_the_store(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.cold_start", "--family", "tiny-sd", "--eager", "--device",
                    "cpu", "--folder", str(tmp_path / "model"), "--workdir", str(tmp_path / "work"), "--out",
                    str(tmp_path)], check=True, capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "cold-start-tiny-sd.json").read_text())
    runs = report["runs"]
    assert [r["phase"] for r in runs] == ["none", "local", "store"] and report["store"] == str(tmp_path / "work/store")
    assert all(r["ok"] and r["ready_s"] > 0 and "read" in r["load_times"] for r in runs)


def test_render_draws_the_newest_batch1_latency_per_variant(tmp_path):
    """The plot in docs/benchmarks.md: one bar per (workload, variant), later files win, memory runs skipped."""
    from benchmarks.render import latency_plot

    def rec(variant, latency, batch=1):
        return {"workload": "sd15-512-50", "variant": variant, "batch": batch, "latency_s": latency}

    records = [("2026-01-01-a", rec("sdserve", 0.9)), ("2026-01-02-b", rec("sdserve", 0.4)),
               ("2026-01-02-b", rec("diffusers-eager", 2.0)), ("2026-01-02-b", rec("sdserve", 0.1, batch=8)),
               ("2026-01-03-memory", rec("diffusers-eager", 5.0))]
    path = tmp_path / "plot.svg"
    assert latency_plot(records, str(path)) == 2
    svg = path.read_text()
    assert svg.startswith("<svg") and svg.count("<rect") == 2 + 5  # two bars + the legend's five swatches
    assert ">0.40<" in svg and ">2.00<" in svg and ">0.90<" not in svg and ">5.00<" not in svg
