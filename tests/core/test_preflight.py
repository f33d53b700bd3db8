"""Resource preflight: what is missing and which key to change; pending warnings said once."""
from __future__ import annotations

import pytest

from core.preflight import Demand, PendingWatcher, ResourceError, check_resources, shortfalls


def gpu_demand(gpus: float, count: int = 1) -> Demand:
    return Demand("engine actors", count, {"CPU": 1, "GPU": gpus}, {"GPU": "--num-gpus", "CPU": "--concurrency"})


def test_half_a_gpu_on_a_cpu_cluster_names_the_flag():
    with pytest.raises(ResourceError) as err:
        check_resources([gpu_demand(0.5)], {"CPU": 2.0})
    text = str(err.value)
    assert "needs 0.5 GPU" in text and "has 0 GPU" in text and "--num-gpus" in text and "\n" not in text


def test_fits_exactly_and_zero_requests_are_ignored():
    check_resources([gpu_demand(0.5, 2)], {"CPU": 2.0, "GPU": 1.0})
    check_resources([gpu_demand(0, 2)], {"CPU": 2.0})


def test_total_over_several_demands_lists_each():
    a = Demand("model 'sdxl' replicas", 1, {"GPU": 0.5}, {"GPU": "models[0].deployment.num_gpus"})
    b = Demand("model 'sd15' replicas", 2, {"GPU": 0.25}, {"GPU": "models[1].deployment.num_gpus"})
    (line,) = shortfalls([a, b], {"GPU": 0.5})
    assert "needs 1 GPU" in line and "models[0].deployment.num_gpus" in line and "models[1]" in line


def test_watcher_warns_once_per_new_message():
    current: list[str] = ["replica pending"]
    said: list[str] = []
    w = PendingWatcher(lambda: current, said.append)
    assert w.check_once() == ["replica pending"] and w.check_once() == []
    current[:] = []
    w.check_once()
    current[:] = ["replica pending"]
    w.check_once()
    assert said == ["replica pending", "replica pending"]  # said again only after it cleared


def test_watcher_survives_a_failing_poll():
    said: list[str] = []

    def poll():
        raise ConnectionError("controller away")

    assert "controller away" in PendingWatcher(poll, said.append).check_once()[0]
