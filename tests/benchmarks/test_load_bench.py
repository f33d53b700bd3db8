"""The open-loop load benchmark (issue 18, benchmarks/load.py): its arrival schedule, traffic profiles, statistics
and accounting, and one real in-process run on the CPU with the tiny model. No timed performance assertions: the
figures are whatever this machine gives; what is checked is that they are computed right and nothing is lost."""
from __future__ import annotations

import asyncio
import json
import statistics
from collections import Counter

import pytest

from benchmarks.load import check_arguments, closed_loop, open_loop
from benchmarks.load_profiles import MIXED_GUIDANCE, MIXED_SCHEDULERS, MIXED_STEPS, draw_bodies, make_profile, \
    parse_sizes, poisson_arrivals
from benchmarks.load_stats import count_outcomes, latency_stats, max_stall, summarize
from benchmarks.load_targets import find_count


# ---------------------------------------------------------------------------------------------- schedule
def test_poisson_arrivals_have_the_requested_mean_rate_and_exponential_gaps():
    rate, duration = 20.0, 500.0
    arrivals = poisson_arrivals(rate, duration, seed=1)
    assert arrivals == sorted(arrivals) and 0 < arrivals[0] and arrivals[-1] < duration
    # count ~ Poisson(10000): sd 100; 4 sd either side
    assert abs(len(arrivals) - rate * duration) < 400
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.04)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.05)  # exponential: CV 1
    assert poisson_arrivals(rate, 10, seed=1) == [t for t in arrivals if t < 10]  # seeded: same schedule
    assert poisson_arrivals(rate, 10, seed=2) != poisson_arrivals(rate, 10, seed=1)
    with pytest.raises(ValueError):
        poisson_arrivals(0, 10, seed=1)


# ---------------------------------------------------------------------------------------------- profiles
def _share(values, n):
    return {k: v / n for k, v in Counter(values).items()}


def test_uniform_bodies_are_identical_but_for_the_seed():
    bodies = draw_bodies(make_profile("uniform"), 50, seed=3)
    fields = {json.dumps({k: v for k, v in b.items() if k not in ("seed", "prompt")}, sort_keys=True) for b in bodies}
    assert fields == {json.dumps({"guidance_scale": 7.5, "height": 512, "output_format": "png", "scheduler": "euler",
                                  "steps": 30, "width": 512}, sort_keys=True)}
    assert len({b["seed"] for b in bodies}) == 50


def test_mixed_profile_draws_steps_guidance_and_scheduler_independently_and_evenly():
    n = 8000
    bodies = draw_bodies(make_profile("mixed"), n, seed=5)
    for field, values in (("steps", MIXED_STEPS), ("guidance_scale", MIXED_GUIDANCE),
                          ("scheduler", MIXED_SCHEDULERS)):
        shares = _share([b[field] for b in bodies], n)
        assert set(shares) == set(values)
        assert all(abs(s - 0.25) < 0.025 for s in shares.values()), (field, shares)
    combos = _share([(b["steps"], b["scheduler"]) for b in bodies], n)
    assert len(combos) == 16 and all(abs(s - 1 / 16) < 0.015 for s in combos.values())
    assert {(b["width"], b["height"]) for b in bodies} == {(512, 512)}
    assert draw_bodies(make_profile("mixed"), 20, seed=5) == bodies[:20]  # seeded


def test_mixed_shapes_profile_draws_the_documented_sizes_and_scales_them():
    n = 8000
    shares = _share([(b["width"], b["height"]) for b in draw_bodies(make_profile("mixed-shapes"), n, seed=7)], n)
    expected = {(512, 512): 3 / 8, (768, 512): 2 / 8, (512, 768): 2 / 8, (1024, 1024): 1 / 8}
    assert set(shares) == set(expected)
    assert all(abs(shares[k] - v) < 0.025 for k, v in expected.items()), shares
    small = make_profile("mixed-shapes", scale=0.125, steps="2,9")
    assert small.sizes == ((64, 64, 3.0), (96, 64, 2.0), (64, 96, 2.0), (128, 128, 1.0)) and small.steps == (2,)
    assert make_profile("mixed", steps="2,3").steps == (2, 3)
    assert make_profile("uniform", sizes="64x64,128x128").sizes == ((64, 64, 1.0),)  # uniform: one size
    assert parse_sizes("768x512:2, 64x64") == ((768, 512, 2.0), (64, 64, 1.0))
    for bad in ("64", "65x64", "64x64:0", ""):
        with pytest.raises(ValueError):
            parse_sizes(bad)


# ---------------------------------------------------------------------------------------------- statistics
def test_percentiles_stall_and_summary_on_known_data():
    assert latency_stats([5.0, 1.0, 3.0, 2.0, 4.0]) == {"p50_s": 3.0, "p95_s": 4.8, "p99_s": 4.96, "mean_s": 3.0,
                                                        "max_s": 5.0}
    assert latency_stats([]) == {"p50_s": None, "p95_s": None, "p99_s": None, "mean_s": None, "max_s": None}
    # busy 0..3 with completions at 1 and 3 (longest quiet time 1 -> 3), idle 3..5, then one request 5 -> 6
    assert max_stall([(0.0, 1.0), (0.5, 3.0), (5.0, 6.0)]) == (2.0, 1.0)
    assert max_stall([(0.0, 0.5), (10.0, 10.25)]) == (0.5, 0.0)  # idle time between is not a stall
    assert max_stall([]) == (0.0, None)

    def req(i, arrival, done, outcome="ok", shape="64x64", batch=2, queue=0.1):
        return {"i": i, "arrival_s": arrival, "sent_s": arrival, "done_s": done, "latency_s": done - arrival,
                "outcome": outcome, "shape": shape, "batch_size": batch if outcome == "ok" else None,
                "queue_s": queue if outcome == "ok" else None}

    requests = [req(0, 0.0, 1.0), req(1, 0.5, 2.0, batch=1, queue=0.3), req(2, 1.0, 4.0, shape="128x128"),
                req(3, 1.5, 2.5, outcome="capacity"), req(4, 1.8, 9.0, outcome="drain_timeout")]
    s = summarize(requests, duration_s=2.0, unloaded={"64x64": [0.5, 0.7], "128x128": [1.0]})
    assert s["counts"] == {"sent": 5, "ok": 3, "errors": {"capacity": 1, "drain_timeout": 1}, "lost": 0}
    assert s["throughput_rps"] == round(3 / 9.0, 4) and s["offered_rps"] == 2.5
    assert s["completed_in_window_rps"] == 1.0  # two ok completions by t = 2 (the window)
    assert s["p50_s"] == 1.5 and s["queue_p99_s"] == pytest.approx(0.296)
    assert s["batch_size_histogram"] == {"1": 1, "2": 2}
    assert s["unloaded_p50_s"] == 0.7 and s["p99_over_unloaded"] == round(s["p99_s"] / 0.7, 3)
    # the last completion is at 4.0; the request given up at 9.0 was outstanding all along: a 5 s stall
    assert (s["max_stall_s"], s["max_stall_at_s"]) == (5.0, 4.0)
    assert s["per_shape"]["64x64"]["sent"] == 4 and s["per_shape"]["64x64"]["ok"] == 2
    assert s["per_shape"]["128x128"] == {"sent": 1, "ok": 1, "p50_s": 3.0, "p95_s": 3.0, "p99_s": 3.0,
                                         "mean_s": 3.0, "max_s": 3.0, "unloaded_p50_s": 1.0, "p99_over_unloaded": 3.0}
    assert list(s["per_shape"]) == ["64x64", "128x128"]  # small first


def test_recompile_count_is_found_anywhere_in_engine_info():
    assert find_count({"name": "x", "metrics": {"compile": {"recompiles": 3}}}) == 3
    assert find_count({"recompile_count": 0}) == 0
    assert find_count({"recompiles": True, "optimizations": {}}) is None  # a flag is not a count
    assert find_count({"optimizations": {"compile": "none"}}) is None


# ---------------------------------------------------------------------------------------------- accounting
class ScriptedTarget:
    """Answers by the request's prompt index: ok / an engine error / an exception / never (held until cancelled)."""

    kind, engine_api = "scripted", "scripted"

    def __init__(self):
        self.held = asyncio.Event()
        self.cancelled = 0

    async def send(self, body):
        i = int(body["prompt"].rsplit(" ", 1)[1])
        if i % 4 == 1:
            return {"outcome": "capacity", "message": "too big"}
        if i % 4 == 2:
            raise RuntimeError("boom")
        if i == 3:
            try:
                await self.held.wait()  # never set: only the drain timeout ends it
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return {"outcome": "ok", "batch_size": 1 + i % 3, "queue_s": 0.0}


def test_open_loop_gives_every_request_one_outcome_and_closed_loop_keeps_concurrency():
    bodies = draw_bodies(make_profile("uniform"), 12, seed=0)
    target = ScriptedTarget()
    records = asyncio.run(open_loop(target, bodies, [0.0] * 12, drain_timeout_s=0.2))
    outcomes = Counter(r["outcome"] for r in records)
    assert outcomes == {"ok": 5, "capacity": 3, "exception:RuntimeError": 3, "drain_timeout": 1}
    assert target.cancelled == 1 and [r["i"] for r in records] == list(range(12))
    assert count_outcomes(records)["lost"] == 0
    assert all(r["latency_s"] is None for r in records if r["outcome"] == "drain_timeout")

    bodies = [b for b in bodies if int(b["prompt"].rsplit(" ", 1)[1]) % 4 == 0]
    records, wall = asyncio.run(closed_loop(ScriptedTarget(), bodies, concurrency=2))
    assert [r["outcome"] for r in records] == ["ok"] * 3 and wall > 0


def test_http_target_reads_batch_size_and_queue_time_from_the_servers_answers():
    import httpx

    from benchmarks.load_targets import HttpTarget
    from core.schemas import GeneratedImage, GenerationResult, Timings
    from serving.http.routes_native import image_headers
    from serving.payloads import result_json

    result = GenerationResult(images=[GeneratedImage(data=b"img", seed=1, media_type="image/png")], width=64,
                              height=64, steps=2, guidance_scale=7.5, scheduler="euler", model="tiny-sd",
                              output_format="png", batch_size=6, timings=Timings(queue_s=0.25))
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, request.headers.get("authorization"), body.get("model")))
        if body["seed"] == 1:
            return httpx.Response(200, content=b"img", headers={"content-type": "image/png", **image_headers(result)})
        if body["seed"] == 2:
            return httpx.Response(200, json=result_json(result))
        return httpx.Response(503, json={"detail": {"message": "queue full", "code": "overloaded"}})

    async def go():
        target = HttpTarget("http://server/", api_key="k", model="tiny-sd", transport=httpx.MockTransport(answer))
        try:
            return [await target.send({"prompt": "p", "seed": s}) for s in (1, 2, 3)]
        finally:
            await target.aclose()

    image, js, busy = asyncio.run(go())
    assert image == {"outcome": "ok", "batch_size": 6, "queue_s": 0.25, "model": "tiny-sd"}
    assert js == image
    assert busy["outcome"] == "backpressure" and "overloaded" in busy["message"]
    assert seen[0] == ("/v1/generate", "Bearer k", "tiny-sd")


def test_engine_target_uses_generate_async_when_the_engine_has_it():
    from benchmarks.load_targets import EngineTarget
    from core.schemas import GeneratedImage, GenerationError, GenerationRequest, GenerationResult, Timings

    class AsyncEngine:  # the shape of the step-level engine's API (issue 18), nothing else
        async def generate_async(self, request: GenerationRequest, on_progress=None, cancel=None):
            if request.width == 128:
                raise GenerationError("too big", "capacity", "width")
            return GenerationResult(images=[GeneratedImage(data=b"x", seed=request.seed, media_type="image/png")],
                                    width=request.width, height=request.height, steps=request.steps,
                                    guidance_scale=7.5, scheduler="euler", model="m", output_format="png",
                                    batch_size=3, timings=Timings(queue_s=0.5))

    target = EngineTarget(AsyncEngine())
    assert target.engine_api == "generate_async"

    async def go():
        return [await target.send({"prompt": "p", "width": w, "height": 64, "steps": 2, "seed": 1})
                for w in (64, 128)]

    assert asyncio.run(go()) == [{"outcome": "ok", "batch_size": 3, "queue_s": 0.5, "model": "m"},
                                 {"outcome": "capacity", "message": "too big"}]


# ---------------------------------------------------------------------------------------------- end to end
def _args(*argv):
    import argparse

    from benchmarks.load import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return check_arguments(p, p.parse_args(list(argv)))


def test_admission_is_set_on_the_engine_config_or_refused_by_name():
    from benchmarks.load import engine_config

    args = _args("--sizes", "64x64")
    assert engine_config(args, "default").source == "embedded:tiny-sd"
    assert engine_config(args, "batch").scheduling.admission == "batch"
    with pytest.raises(ValueError, match="admission"):
        engine_config(args, "no-such-policy")


def test_set_admission_validates_the_value_and_keeps_the_rest_of_the_config():
    from benchmarks.load_targets import admission_of, set_admission
    from core.config import EngineConfig

    base = EngineConfig(limits={"max_batch_size": 4})
    batch = set_admission(base, "batch")
    assert admission_of(batch) == "batch" and admission_of(base) == "step" and batch.limits.max_batch_size == 4
    with pytest.raises(ValueError, match="admission"):
        set_admission(base, "bogus")


@pytest.fixture
def one_torch_thread():
    """2 shared cores: OpenMP spinning in several busy processes makes a 64² call 100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_in_process_run_writes_one_complete_record_per_profile_and_rate(tmp_path, sdserve_cache_dir,
                                                                         one_torch_thread, capsys):
    from benchmarks.load import main

    argv = ["--profiles", "uniform,mixed-shapes", "--scale", "0.125", "--steps", "2", "--rates", "2",
            "--duration-s", "1.5", "--drain-timeout-s", "300", "--capacity-requests", "6", "--concurrency", "3",
            "--unloaded-requests", "1", "--out", str(tmp_path), "--tag", "t"]
    assert main(argv) == 0
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert [f[len("YYYY-MM-DD-"):] for f in files] == ["cpu-tiny-sd-mixed-shapes-step-r2-t.json",
                                                       "cpu-tiny-sd-uniform-step-r2-t.json"]
    records = {json.loads(p.read_text())["profile"]: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(records) == {"uniform", "mixed-shapes"}
    required = {"bench", "device", "model", "profile", "admission", "rate_fraction", "rate_rps", "throughput_rps",
                "p50_s", "p95_s", "p99_s", "queue_p99_s", "unloaded_p50_s", "batch_size_histogram", "recompiles",
                "counts", "max_stall_s", "per_shape", "command", "capacity_rps", "saturation", "requests"}
    for name, r in records.items():
        assert required <= set(r), required - set(r)
        assert r["bench"] == "load" and r["device"] == "cpu" and r["model"] == "tiny-sd"
        assert r["engine_api"] in ("threads", "generate_async") and r["target"] == "in-process"
        c = r["counts"]
        assert c["sent"] == len(r["requests"]) and c["ok"] + sum(c["errors"].values()) == c["sent"] and c["lost"] == 0
        assert c["ok"] == c["sent"], c  # drain timeout 300 s: everything finishes
        assert sum(r["batch_size_histogram"].values()) == c["ok"]
        assert r["capacity_from"] == "uniform, default" and r["capacity_rps"] == records["uniform"]["saturation"]["rps"]
        assert r["rate_rps"] == pytest.approx(2 * r["capacity_rps"], abs=1e-3)
        assert r["unloaded_p50_s"] > 0 and r["command"].startswith("python -m benchmarks.load --profiles")
        assert sum(s["sent"] for s in r["per_shape"].values()) == c["sent"]
        if c["ok"]:
            assert 0 < r["p50_s"] <= r["p95_s"] <= r["p99_s"] and r["max_stall_s"] > 0
            # threads calling generate(): no queue time to read (null, not a made-up 0)
            assert (r["queue_p99_s"] is None) == (r["engine_api"] == "threads")
    assert list(records["mixed-shapes"]["per_shape"]) == ["64x64", "64x96", "96x64", "128x128"]  # by pixels
    assert all(s["unloaded_p50_s"] > 0 for s in records["mixed-shapes"]["per_shape"].values())
    assert records["mixed-shapes"]["saturation"]["requests"] == 6
    table = capsys.readouterr().out
    assert "| tiny-sd | mixed-shapes | step | t | 2 |" in table and "| 128x128 |" in table

    # a later call of a split run takes this capacity; the tables go between the doc's markers
    from benchmarks.load_report import capacity_from_records
    from benchmarks.load_report import main as report

    rps, where = capacity_from_records(str(tmp_path), "tiny-sd", "uniform")
    assert rps == records["uniform"]["capacity_rps"] and "uniform, default (from " in where
    with pytest.raises(ValueError, match="capacity profile mixed"):
        capacity_from_records(str(tmp_path), "tiny-sd", "mixed")
    doc = tmp_path / "doc.md"
    doc.write_text("# x\n<!-- LOAD:START -->\nold\n<!-- LOAD:END -->\ntail\n")
    assert report([str(tmp_path), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and text.endswith("<!-- LOAD:END -->\ntail\n")
    assert "| tiny-sd | uniform | step | t | 2 |" in text and "| saturation req/s |" in text


def test_one_engine_serves_both_admissions_from_one_load(tmp_path, sdserve_cache_dir, one_torch_thread,
                                                        monkeypatch):
    import benchmarks.load as load

    built = []
    real = load.build_target
    monkeypatch.setattr(load, "build_target", lambda args, adm: built.append(adm) or real(args, adm))
    argv = ["--profiles", "uniform", "--admission", "step,batch", "--one-engine", "--scale", "0.125", "--steps", "2",
            "--rates", "1.5", "--duration-s", "1", "--drain-timeout-s", "300", "--capacity-requests", "4",
            "--concurrency", "2", "--unloaded-requests", "1", "--out", str(tmp_path)]
    assert load.main(argv) == 0
    assert built == ["step"]  # loaded once; the batch pass switched the same engine
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    by_admission = {r["admission"]: r for r in records}
    assert set(by_admission) == {"step", "batch"}
    for name, r in by_admission.items():
        assert r["engine"]["scheduling"]["admission"] == name and r["admission_requested"] == name
        assert r["counts"]["ok"] == r["counts"]["sent"] > 0
    assert by_admission["batch"]["capacity_rps"] == by_admission["step"]["capacity_rps"]
    with pytest.raises(SystemExit):
        load.main(["--url", "http://127.0.0.1:1", "--one-engine", "--capacity-rps", "1"])


def test_sdserve_bench_load_takes_the_benchmarks_own_arguments():
    from sdserve.cli import build_parser

    args = build_parser().parse_args(["bench", "load", "cfg.yaml", "--profiles", "mixed", "--rates", "0.7",
                                      "--admission", "batch,step"])
    assert args.func.__name__ == "_bench_load" and args.config == "cfg.yaml"
    checked = check_arguments(args._load_parser, args)
    assert (checked.profiles, checked.rates, checked.admission) == (["mixed"], [0.7], ["batch", "step"])
    with pytest.raises(SystemExit):
        check_arguments(args._load_parser, build_parser().parse_args(["bench", "load", "--rates", "0"]))


def test_saturation_steady_rate_leaves_out_ramp_up_and_drain():
    from benchmarks.load import saturation

    # concurrency 2: completions at 1, 2 (ramp-up), then one every 0.5 s from 3 to 6, then a slow drain at 10, 12
    done = [1.0, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 10.0, 12.0]
    records = [{"outcome": "ok", "done_s": d, "latency_s": 1.0, "batch_size": 1} for d in done]
    s = saturation(records, wall_s=12.0, concurrency=2)
    assert s["rps"] == round(11 / 12.0, 4)
    # from the 3rd completion (t=3) to the 3rd-last (t=6): 6 completions in 3 s
    assert s["steady_rps"] == 2.0
    assert saturation(records[:4], wall_s=4.0, concurrency=2)["steady_rps"] is None  # too few to tell
