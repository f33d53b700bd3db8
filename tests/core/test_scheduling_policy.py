"""The cross-group pick (core/scheduling_policy.py): least remaining work first, but every group with work gets at
least scheduling.min_share of the UNet calls, and starvation_s stays the hard time bound. Pure policy tests on
synthetic call sets, then the engine: a large request admitted first while small ones keep arriving finishes
within the share's bound of calls (and the old policy, min_share 0, holds it back until the stream ends)."""
from __future__ import annotations

import math
import time

import pytest
from pydantic import ValidationError

from core.scheduling_policy import MAX_CREDIT, CallSet, FairShare

LARGE_CALLS = 6


def small(work=1.0, last_run=0.0, oldest=1.0, group="small", payload=None, cost=1.0):
    return CallSet(group, work, oldest, last_run, payload, cost)


def large(work=100.0, last_run=0.0, oldest=0.0, group="large", payload=None, cost=1.0):
    return CallSet(group, work, oldest, last_run, payload, cost)


def stream(policy: FairShare, large_calls: int, limit: int = 1000) -> list[str]:
    """A large group (admitted first, most work) needing `large_calls` calls against small work that never runs out:
    the groups that ran, in order, until the large one is done."""
    order, left = [], large_calls
    while left and len(order) < limit:
        now = float(len(order))
        picked = policy.pick([small(last_run=now), large(work=100.0 * left, last_run=now)], now)
        order.append(picked.group)
        left -= picked.group == "large"
    return order


def bound(i: int, share: float) -> int:
    """The call (1-based) by which a group passed over from the start has had its i-th call: it earns `share` of a
    call per call it is passed over and runs once it has earned a whole one."""
    return math.ceil(i / share) + i


@pytest.mark.parametrize("share", [0.1, 0.2, 0.25, 1 / 3, 0.5])
def test_a_large_group_gets_its_share_of_the_calls_under_a_stream_of_small_work(share):
    order = stream(FairShare(share, starvation_s=1e9), LARGE_CALLS)
    positions = [n for n, group in enumerate(order, 1) if group == "large"]
    assert len(positions) == LARGE_CALLS
    for i, pos in enumerate(positions, 1):  # spread over the stream, not all at its end
        assert pos <= bound(i, share), (share, order)
    # ... and the small work gives up at most that share (one call of rounding)
    assert order.count("small") >= (1 - share) * len(order) - 1, order


def timed_stream(policy: FairShare, large_calls: int, large_cost: float) -> tuple[list[str], float, float]:
    """stream() with costs per call (seconds; a large call costs large_cost small ones): the order, and the time
    each group ran until the large one is done."""
    order, left, spent = [], large_calls, {"small": 0.0, "large": 0.0}
    while left:
        now = sum(spent.values())
        picked = policy.pick([small(last_run=now), large(work=100.0 * left, last_run=now, cost=large_cost)], now)
        order.append(picked.group)
        spent[picked.group] += picked.cost
        left -= picked.group == "large"
    return order, spent["small"], spent["large"]


@pytest.mark.parametrize("share", [0.1, 0.25, 1 / 3, 0.5])
def test_with_costs_in_time_a_large_group_gets_its_share_of_the_time_not_of_the_calls(share):
    """A large call costs 4 small ones: the large group gets ~min_share of the GPU time (within one of its calls),
    so it gets far fewer than min_share of the calls - small work gives up min_share of the time, no more."""
    order, small_s, large_s = timed_stream(FairShare(share, starvation_s=1e9), 4 * LARGE_CALLS, large_cost=4.0)
    total = small_s + large_s
    assert share - 4.0 / total <= large_s / total <= share + 4.0 / total, order
    # calls: each large call waits for 4 x (1 - share) / share small ones (the share counted in calls: 1/share)
    calls = order.count("large") / len(order)
    assert calls == pytest.approx(1 / (1 + 4 * (1 - share) / share), abs=1.0 / len(order) + 0.01), order
    assert calls < share


def test_the_share_in_time_is_bounded_per_call_of_the_waiting_group():
    """Its credit is capped at MAX_CREDIT of its own calls; earnings in seconds of other calls (up to a big
    estimate change: the credit of a set first costed at 1.0, then measured at 10 ms) never exceed it."""
    policy = FairShare(0.25, starvation_s=1e9)
    policy.credit["large"] = MAX_CREDIT * 1.0  # the most it can hold while nothing is measured (all cost 1.0)
    picked = policy.pick([small(cost=0.005), large(cost=0.010)], 0.0)
    assert (picked.group, policy.last_reason) == ("large", "owed")
    assert policy.credit["large"] <= MAX_CREDIT * 0.010  # not 200 more calls owed: capped at its measured cost
    order = [policy.pick([small(cost=0.005), large(cost=0.010)], 0.0).group for _ in range(100)]
    assert order.count("large") <= 100 * 0.25 / (2 - 0.25) + 2, order  # its share of the time, no more
    assert max(policy.credit.values()) <= MAX_CREDIT * 0.010


def test_without_a_share_the_large_group_waits_for_the_small_work():
    """min_share 0 is the old policy: least work only, so (time bound aside) the large group never runs."""
    order = stream(FairShare(0.0, starvation_s=1e9), LARGE_CALLS, limit=200)
    assert order == ["small"] * 200


def test_without_a_share_costs_change_nothing():
    """min_share 0 with costs in time is still least work only: no credit, the large group never runs."""
    policy = FairShare(0.0, starvation_s=1e9)
    for n in range(100):
        picked = policy.pick([small(cost=0.01), large(cost=0.04)], float(n))
        assert (picked.group, policy.last_reason) == ("small", "least-work")
    assert policy.credit == {}


def test_the_time_bound_still_runs_a_starved_set_first():
    policy = FairShare(0.25, starvation_s=2.0)
    policy.credit["small"] = 1.5  # owed, and less work: it would win but for the time bound
    picked = policy.pick([small(last_run=9.0), large(last_run=7.5)], now=10.0)
    assert (picked.group, policy.last_reason) == ("large", "starved")


def test_least_work_first_and_ties_to_the_oldest_request():
    policy = FairShare(0.25, starvation_s=1e9)
    assert policy.pick([large(work=5), small(work=4)], 0.0).group == "small"
    assert policy.last_reason == "least-work"
    assert policy.pick([small(work=4, oldest=2.0, group="a"), small(work=4, oldest=1.0, group="b")], 0.0).group == "b"


def test_credit_is_charged_and_dropped_when_a_group_is_idle():
    policy = FairShare(0.25, starvation_s=1e9)
    for _ in range(3):
        policy.pick([small(), large()], 0.0)
    assert policy.credit == {"small": 0.0, "large": 0.75}
    policy.pick([small()], 0.0)  # the large group has no active samples: its credit goes (no banking while idle)
    assert "large" not in policy.credit
    policy.pick([small(), large()], 0.0)
    assert policy.credit["large"] == 0.25


def test_credit_in_seconds_is_charged_and_dropped_when_a_group_is_idle():
    policy = FairShare(0.25, starvation_s=1e9)
    sets = [small(cost=0.010), large(cost=0.040)]
    for _ in range(3):
        policy.pick(sets, 0.0)
    assert policy.credit == {"small": 0.0, "large": pytest.approx(0.0075)}  # 3 x 0.25 x 10 ms
    policy.pick(sets[:1], 0.0)  # the large group idle: its credit goes
    assert "large" not in policy.credit


def test_an_owed_group_runs_its_least_work_set():
    """With the step cache a group has a full and a shallow set; the owed group runs its smaller one."""
    policy = FairShare(0.5, starvation_s=1e9)
    policy.credit["large"] = 1.0
    sets = [small(), large(work=300, payload="full"), large(work=200, payload="shallow")]
    picked = policy.pick(sets, 0.0)
    assert (picked.payload, policy.last_reason) == ("shallow", "owed")
    assert policy.credit["large"] == 0.5 and policy.credit["small"] == 0.5


def test_more_groups_than_shares_take_turns_with_bounded_credit():
    """Six groups at min_share 0.25 (shares add up to 1.5): credits stay bounded and the groups take turns."""
    policy, order = FairShare(0.25, starvation_s=1e9), []
    last = dict.fromkeys("abcdef", 0.0)
    for n in range(1, 121):
        sets = [CallSet(g, work=i + 1.0, oldest=float(i), last_run=last[g]) for i, g in enumerate("abcdef")]
        group = policy.pick(sets, float(n)).group
        last[group] = float(n)
        order.append(group)
        assert max(policy.credit.values()) <= MAX_CREDIT
    for g in "abcdef":  # once all are owed, each group runs once in every 6 consecutive calls
        runs = [n for n, x in enumerate(order) if x == g]
        assert max(b - a for a, b in zip(runs[2:], runs[3:])) <= 6, (g, order)
    assert order[-6:].count("a") == 1 and len(set(order[-6:])) == 6, order  # not the oldest group hogging


def test_min_share_is_validated_by_name(make_config):
    from core.config import SchedulingConfig

    assert SchedulingConfig().min_share == 0.25
    assert SchedulingConfig(starvation_s=5).min_share == 0.25  # existing configs (starvation_s only) still load
    for bad in (-0.1, 0.75):
        with pytest.raises(ValidationError, match="min_share"):
            make_config(scheduling={"min_share": bad})
    with pytest.raises(ValueError, match="min_share"):
        FairShare(1.5, 2.0)
    assert SchedulingConfig().share_unit == "auto"
    with pytest.raises(ValidationError, match="share_unit"):
        make_config(scheduling={"share_unit": "seconds"})


def run_large_in_a_small_stream(eng, req, ok, monkeypatch, smalls: int, seconds: list | None = None) -> list[int]:
    """A stream of small requests (64x64, 2 steps; each submits the next at its first step, so small work never
    runs out until `smalls` were sent) and, right after the first, a large one (128x128). The latent width of
    every UNet call, in order (and its seconds appended to `seconds`)."""
    seconds = [] if seconds is None else seconds
    unet, forward, widths = eng.pipe.unet, eng.pipe.unet.forward, []

    def spy(sample, *args, **kwargs):
        widths.append(sample.shape[-1])
        t0 = time.perf_counter()
        out = forward(sample, *args, **kwargs)
        seconds.append(time.perf_counter() - t0)
        return out

    monkeypatch.setattr(unet, "forward", spy)
    state = {"left": smalls, "jobs": []}

    def next_small(step=1, _total=0, _latents=None):
        if step == 1 and state["left"]:
            state["left"] -= 1
            state["jobs"].append(eng.submit(req(seed=100 + state["left"], steps=2), on_progress=next_small))

    next_small()
    big = eng.submit(req(seed=1, steps=LARGE_CALLS, width=128, height=128))
    ok(big.future.result(timeout=300))
    while state["left"] or not all(j.future.done() for j in state["jobs"]):
        ok(state["jobs"][-1].future.result(timeout=300))
    for job in state["jobs"]:
        ok(job.future.result(timeout=300))
    return widths


def test_a_large_request_in_a_stream_of_small_ones_finishes_within_its_share(make_config, req, ok, monkeypatch):
    from core.engine import Engine

    share = 0.25  # the default
    eng = Engine(make_config(scheduling={"starvation_s": 600})).load()  # the time bound out of reach
    assert eng.config.scheduling.min_share == share
    widths = run_large_in_a_small_stream(eng, req, ok, monkeypatch, smalls=60)
    positions = [n for n, w in enumerate(widths, 1) if w == 16]  # 128 px: latent width 16
    assert len(positions) == LARGE_CALLS
    for i, pos in enumerate(positions, 1):  # +1: the first small call may run before the large request arrives
        assert pos <= bound(i, share) + 1, widths
    assert len(widths) > positions[-1] + 10, "the small stream outlasted the large request"
    picks = eng.info()["scheduling"]["picks"]  # the large request's calls were owed ones (the time bound: never)
    assert picks["owed"] >= LARGE_CALLS - 1 and "starved" not in picks and sum(picks.values()) == len(widths), picks
    assert eng.info()["scheduling"]["share_unit"] == "calls"  # auto, not compiled: the share counts calls
    small_calls = positions[-1] - LARGE_CALLS
    assert small_calls >= (1 - share) * positions[-1] - 1, widths  # the small ones kept 3/4 of the calls

    # The old policy (min_share 0: least work only): the large request waits for the stream to end.
    old = Engine(make_config(scheduling={"min_share": 0, "starvation_s": 600})).load()
    widths = run_large_in_a_small_stream(old, req, ok, monkeypatch, smalls=60)
    positions = [n for n, w in enumerate(widths, 1) if w == 16]
    assert len(positions) == LARGE_CALLS and positions[0] > bound(LARGE_CALLS, share) + 1, widths
    assert positions == list(range(len(widths) - LARGE_CALLS + 1, len(widths) + 1)), widths  # all at the end


def test_with_the_share_in_time_the_large_request_gets_its_share_of_the_measured_time(make_config, req, ok,
                                                                                        monkeypatch):
    """share_unit time on CPU: each call's perf_counter time is its cost. The large request's calls are owed ones
    spread through the stream (it finishes while small ones still run), and it gets about min_share of the UNet
    time until then - checked loosely (half the share), as the tiny model's CPU timings are noisy."""
    from core.engine import Engine

    share = 0.25
    eng = Engine(make_config(scheduling={"starvation_s": 600, "share_unit": "time"})).load()
    seconds: list[float] = []
    widths = run_large_in_a_small_stream(eng, req, ok, monkeypatch, smalls=150, seconds=seconds)
    positions = [n for n, w in enumerate(widths, 1) if w == 16]
    assert len(positions) == LARGE_CALLS
    assert len(widths) > positions[-1] + 10, "the large request ran only after the small stream"
    info = eng.info()["scheduling"]
    assert info["share_unit"] == "time" and info["picks"]["owed"] >= LARGE_CALLS - 1, info
    assert "starved" not in info["picks"], info
    ms = info["call_ms"]  # measured per group: both sizes, a positive cost each
    assert {k.split()[-1] for k in ms} == {"64x64", "128x128"} and min(ms.values()) > 0, ms
    window = seconds[:positions[-1]]
    large_s = sum(t for t, w in zip(window, widths) if w == 16)
    assert large_s >= share / 2 * sum(window), (large_s, sum(window), widths)
