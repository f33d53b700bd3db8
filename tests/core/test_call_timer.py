"""core/call_timer.py: measured seconds per UNet call per set, folded into an EWMA without a host wait. The CUDA
path's polling runs here on fake events (query()/elapsed_time() like torch.cuda.Event); the CPU path times for
real with perf_counter."""
from __future__ import annotations

import time

import pytest

from core.call_timer import ALPHA, MAX_PENDING, CallTimer


class FakeEvent:
    """A torch.cuda.Event stand-in: done once the test says so; elapsed_time in ms from recorded stamps."""

    def __init__(self, at_ms: float, done: bool = True):
        self.at_ms, self.done = at_ms, done

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.done and end.done, "elapsed_time on an event not done would make the host wait"
        return end.at_ms - self.at_ms


def test_costs_fold_into_an_ewma_per_set():
    timer = CallTimer(use_cuda=False)
    timer.fold("small", 1.0, 0.010)
    timer.fold("large", 4.0, 0.040)
    timer.fold("small", 1.0, 0.020)
    assert timer.seconds["small"] == pytest.approx(0.010 + ALPHA * 0.010)
    assert timer.seconds["large"] == pytest.approx(0.040)
    assert timer.report_ms() == {"small": pytest.approx(13.0), "large": pytest.approx(40.0)}


def test_the_cpu_path_times_the_block_and_skips_a_failed_call():
    timer = CallTimer(use_cuda=False)
    with timer.measure("g", 1.0):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.02:  # busy: a call that takes >= 20 ms
            pass
    assert 0.02 <= timer.seconds["g"] < 1.0
    with pytest.raises(RuntimeError), timer.measure("bad", 1.0):
        raise RuntimeError("call failed")
    assert "bad" not in timer.seconds


def test_poll_folds_completed_pairs_oldest_first_and_never_waits_for_one_running():
    timer = CallTimer(use_cuda=True)
    timer.add_pending("a", 1.0, FakeEvent(0.0), FakeEvent(10.0))
    running = FakeEvent(30.0, done=False)
    timer.add_pending("b", 1.0, FakeEvent(10.0), running)
    timer.add_pending("a", 1.0, FakeEvent(30.0), FakeEvent(50.0))  # done, but queued behind the running call
    timer.poll()
    assert timer.seconds == {"a": pytest.approx(0.010)} and len(timer.pending) == 2
    running.done = True
    timer.poll()
    assert timer.seconds == {"a": pytest.approx(0.010 + ALPHA * 0.010), "b": pytest.approx(0.020)}
    assert not timer.pending


def test_pending_pairs_are_bounded():
    timer = CallTimer(use_cuda=True)
    for n in range(MAX_PENDING + 5):
        timer.add_pending(n, 1.0, FakeEvent(0.0, done=False), FakeEvent(1.0, done=False))
    assert len(timer.pending) == MAX_PENDING and timer.pending[0][0] == 5  # the oldest dropped unmeasured


def test_an_unmeasured_set_is_estimated_from_the_measured_ones_by_work_units():
    timer = CallTimer(use_cuda=False)
    assert timer.estimate("new", 4.0) == 1.0  # nothing measured: all equal (the call-count share)
    timer.fold("small", 2.0, 0.010)  # 5 ms per unit
    timer.fold("mid", 4.0, 0.040)  # 10 ms per unit
    assert timer.estimate("small", 100.0) == pytest.approx(0.010)  # its own measurement, whatever the units
    assert timer.estimate("new", 8.0) == pytest.approx(8.0 * 0.0075)


@pytest.mark.gpu
def test_cuda_events_time_a_call_once_it_has_completed():
    """Real events: nothing is folded before poll() sees the end event done; then the GPU time of the block."""
    import torch

    timer = CallTimer()
    x = torch.randn(4096, 4096, device="cuda")
    with timer.measure("matmul", 1.0):
        for _ in range(20):
            x = x @ x / 64
    assert timer.use_cuda and len(timer.pending) == 1 and "matmul" not in timer.seconds
    torch.cuda.synchronize()  # the test waits; the engine never does (it polls at its next step)
    timer.poll()
    assert not timer.pending and timer.seconds["matmul"] > 0


def test_a_cost_never_reads_zero():
    timer = CallTimer(use_cuda=False)
    timer.fold("instant", 1.0, 0.0)
    assert timer.estimate("instant", 1.0) > 0 and timer.estimate("other", 1.0) > 0
