"""deploy/grafana/sdserve.json: every query names metrics (and labels) that the running app really exports, read
from a live scrape of Ray's Prometheus endpoint (the node's metrics_export_port) after real requests."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sdserve.json"
METRIC = re.compile(r"\b(ray_[a-zA-Z0-9_]+)")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="')


def _queries(dash: dict) -> list[str]:
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    out += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return out


def _labels_used(expr: str) -> set[str]:
    used = {name.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for name in group.split(",")}
    used |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"", expr))
    used |= set(re.findall(r"label_values\([^,]+,\s*([a-zA-Z_][a-zA-Z0-9_]*)\)", expr))
    return used - {""}


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(graphs) >= 12
    for p in graphs:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
    names = {m for q in _queries(dash) for m in METRIC.findall(q)}
    # what the issue asks the dashboard to show
    for needed in ("ray_serve_num_http_requests_total", "ray_serve_num_http_error_requests_total",
                   "ray_sdserve_errors_total", "ray_sdserve_stage_latency_s_bucket", "ray_sdserve_batch_images_bucket",
                   "ray_sdserve_queue_length", "ray_sdserve_peak_vram_bytes", "ray_sdserve_compiled_graphs"):
        assert needed in names, needed
    stages = " ".join(q for q in _queries(dash) if "stage_latency" in q)
    assert all(s in stages for s in ("queue", "denoise", "decode", "encode"))


def _scrape(url: str) -> dict[str, set[str]]:
    """metric name -> label names seen on its samples."""
    seen: dict[str, set[str]] = {}
    for line in httpx.get(url, timeout=30).text.splitlines():
        m = SAMPLE.match(line)
        if m and not line.startswith("#"):
            seen.setdefault(m.group(1), set()).update(LABEL.findall(m.group(2) or ""))
    return seen


@pytest.mark.integration
def test_every_query_names_an_exported_metric(serve_url, client):
    import ray

    for steps in (2, 3):  # successes: stage latencies, batches, images, VRAM, compiled graphs
        assert client.post("/v1/generate", json={"prompt": "metrics", "steps": steps}).status_code == 200
    assert client.post("/v1/generate", json={"prompt": "too big", "width": 4096, "height": 4096}).status_code == 422
    assert httpx.post(f"{serve_url}/v1/generate", json={"prompt": "no key"}).status_code == 401

    dash = json.loads(DASHBOARD.read_text())
    wanted = {m for q in _queries(dash) for m in METRIC.findall(q)}
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline = time.monotonic() + 120  # Ray exports every few seconds; wait for the first export that has them all
    while True:
        exported = _scrape(url)
        missing = wanted - set(exported)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # a scrape is cheap; Ray's export interval is the wait
    assert not missing, f"dashboard queries name metrics the app does not export: {sorted(missing)}"
    for q in _queries(dash):
        labels = set().union(*(exported[m] for m in METRIC.findall(q)))
        assert _labels_used(q) <= labels | {"le"}, (q, _labels_used(q) - labels)
