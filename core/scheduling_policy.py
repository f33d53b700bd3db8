"""Which call set the step scheduler runs next across groups (shapes): least remaining work first, with a
guaranteed minimum share of UNet calls per group. Pure Python (no torch): core/step_scheduler.py builds the
candidate sets and hands them here; tests drive it with synthetic sets.

Why a share and not only a time bound. Least remaining work first (SRPT) keeps small and nearly finished requests
fast, but under continuous small traffic a large shape is never the least work: before this policy only
`starvation_s` let it run, one call per starvation_s, so a 30-step 1024² SDXL request took ~30 x 2 s (measured:
p50 18.6 s vs 2.35 s unloaded, p95 57 s at saturation). In eager SDXL a call is host-bound (~70 ms at 512², ~78 ms
at 1024²), so SRPT's preference bought the small requests little and cost the large one everything.

The policy (stride/credit scheduling on top of SRPT), before every call:
1. a set that has not run for `starvation_s` seconds runs first, the longest-waiting one: the hard time bound;
2. else a group that is owed a call (credit >= 1) runs, the highest credit first (ties: the one waiting longest,
   then the oldest request), its set with the least work (with the step cache a group has a full and a shallow
   set);
3. else the set with the least remaining work (ties: the oldest request).
Then every other group with active samples earns `min_share` of a call, and the group that ran pays
1 - min_share (never below 0: a group that SRPT favours banks no debt). So a group that waits gets at least
min_share of the calls (credit = min_share x calls since it became active - its calls, owed at 1): a large
request of N calls competing with a stream of small ones finishes within about N / min_share calls, and the
others give up at most min_share of the calls to it. The credit of a group without active samples is dropped (no
banking while idle), and a credit is capped at MAX_CREDIT: when more than 1 / min_share groups compete they are
all owed and take turns (round robin: equal credits go to the longest-waiting) instead of the credits growing
without end.

The share is counted in calls, not seconds: deterministic and testable, and what matters where calls are
host-bound (eager; the measured case). Where a large call costs several small ones on the GPU (compiled UNets:
~4x at 1024² vs 512²) the large group's share of the GPU time is larger than min_share; lower min_share there.
The default, 0.25, from experiments/scheduling_sim.py (this class on the mixed-shapes profile, eager H100 costs,
0.546 req/s = 0.7 x capacity; p99 over unloaded, least work only -> 0.25): 512² 7.5 -> 5.8, 768x512 19.5 -> 6.1,
512x768 14.5 -> 6.1, 1024² 26.6 -> 6.2 (p50 512² 1.2 -> 2.0, 1024² 6.6 -> 3.6); 0.2 or 0.33 are close, 0.1 leaves
1024² at 12.6. With compiled (GPU-bound) costs the same shares lengthen the small sizes' tail (512² p99 4.7 ->
11.3 at 0.25, 6.5 at 0.1): there set 0.1, or 0. Weighting the credit by measured GPU time per call (CUDA events)
is the next step if one default must serve both.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Hashable

MAX_CREDIT = 2.0  # calls' worth a group can be owed at most (bounds the credit when the shares add up to more than 1)
OWED = 1.0 - 1e-9  # a whole call earned (sums of float shares such as 0.1 fall a hair short of one)


@dataclass(frozen=True)
class CallSet:
    """One candidate for the next UNet call."""

    group: Hashable  # the group (core/batching.group_key) whose share it counts against
    work: float  # remaining work: UNet calls until one of its samples finishes x latent pixels x rows
    oldest: float  # submission time of its oldest request (ties)
    last_run: float  # when the set's longest-waiting sample last ran
    payload: Any = None  # the scheduler's own data (key, phase, samples)
    cost: float = 1.0  # estimated seconds per call (core/call_timer.py); all equal: the share counts calls


class FairShare:
    """The cross-group pick with its per-group credits in seconds (one instance per step scheduler; one thread)."""

    def __init__(self, min_share: float, starvation_s: float):
        if not 0 <= min_share <= 1:
            raise ValueError(f"min_share must be within [0, 1], got {min_share}")
        self.min_share = min_share
        self.starvation_s = starvation_s
        self.credit: dict[Hashable, float] = {}  # seconds of calls earned
        self.last_reason = ""  # why the last pick was made: starved, owed or least-work
        self.picks: Counter = Counter()  # picks by that reason (engine.info()["scheduling"]["picks"])

    def pick(self, sets: list[CallSet], now: float) -> CallSet:
        """The set to run next; the credits are charged for it (call this once per UNet call)."""
        if not sets:
            raise ValueError("no call sets to pick from")
        cost = group_costs(sets)
        starved = [s for s in sets if now - s.last_run > self.starvation_s]
        owed = [s for s in sets if self.credit.get(s.group, 0.0) >= OWED * s.cost]
        if starved:
            choice, self.last_reason = min(starved, key=lambda s: (s.last_run, s.oldest)), "starved"
        elif owed:  # the most calls owed first (capped ones tie), then the one waiting longest (turns), then age
            def owed_calls(s):
                return round(min(MAX_CREDIT, self.credit[s.group] / cost[s.group]), 6)

            top = max(owed_calls(s) for s in owed)
            group = min((s for s in owed if owed_calls(s) == top), key=lambda s: (s.last_run, s.oldest)).group
            choice = least_work([s for s in owed if s.group == group])
            self.last_reason = "owed"
        else:
            choice, self.last_reason = least_work(sets), "least-work"
        self.picks[self.last_reason] += 1
        self.charge(choice.group, choice.cost, cost)
        return choice

    def charge(self, ran: Hashable, seconds: float, active: dict[Hashable, float]) -> None:
        """`ran` got a call costing `seconds` while the groups in `active` (-> their cost per call) had work: the
        others earn min_share of it, `ran` pays the rest (never below 0: a group SRPT favours banks no debt)."""
        for group in [g for g in self.credit if g not in active]:
            del self.credit[group]  # no active samples: no banking while idle
        if not self.min_share:
            return
        for group, per_call in active.items():
            credit = self.credit.get(group, 0.0)
            if group == ran:
                credit = max(0.0, credit - (1.0 - self.min_share) * seconds)
            else:
                credit += self.min_share * seconds
            # capped in the group's own calls (also when its cost estimate has just dropped: measured at last)
            self.credit[group] = min(MAX_CREDIT * per_call, credit)


def group_costs(sets: list[CallSet]) -> dict[Hashable, float]:
    """Each group's cost per call: its cheapest set's (a group has a full and a shallow set with the step cache)."""
    cost: dict[Hashable, float] = {}
    for s in sets:
        cost[s.group] = min(cost.get(s.group, s.cost), s.cost)
    return cost


def least_work(sets: list[CallSet]) -> CallSet:
    """Shortest remaining processing time first; ties go to the oldest request."""
    return min(sets, key=lambda s: (s.work, s.oldest))
