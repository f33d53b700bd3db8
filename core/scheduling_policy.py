"""Which call set the step scheduler runs next across groups (shapes): least remaining work first, with a
guaranteed minimum share of UNet calls (or of GPU time) per group. Pure Python (no torch):
core/step_scheduler.py builds the candidate sets and hands them here; tests drive it with synthetic sets.

Why a share and not only a time bound. Least remaining work first (SRPT) keeps small and nearly finished requests
fast, but under continuous small traffic a large shape is never the least work: before this policy only
`starvation_s` let it run, one call per starvation_s, so a 30-step 1024² SDXL request took ~30 x 2 s (measured:
p50 18.6 s vs 2.35 s unloaded, p95 57 s at saturation). In eager SDXL a call is host-bound (~70 ms at 512², ~78 ms
at 1024²), so SRPT's preference bought the small requests little and cost the large one everything.

The policy (stride/credit scheduling on top of SRPT), before every call; each set carries its cost per call
(`CallSet.cost`, seconds: core/call_timer.py measures them; all 1.0 when the share counts calls):
1. a set that has not run for `starvation_s` seconds runs first, the longest-waiting one: the hard time bound;
2. else a group that is owed a call (credit >= its set's cost) runs, the most calls owed first (ties: the one
   waiting longest, then the oldest request), its set with the least work (with the step cache a group has a
   full and a shallow set);
3. else the set with the least remaining work (ties: the oldest request).
Then, the call costing c, every other group with active samples earns min_share x c and the group that ran pays
(1 - min_share) x c (never below 0: a group that SRPT favours banks no debt). So a group that waits gets at least
min_share of the calls (costs 1.0) or of the GPU time (measured costs): a large request of N calls competing with
a stream of small ones finishes within about N / min_share calls' worth, and the others give up at most
min_share to it. The credit of a group without active samples is dropped (no banking while idle), and a credit is
capped at MAX_CREDIT of the group's own calls: when more than 1 / min_share groups compete they are all owed and
take turns (round robin: equal credits go to the longest-waiting) instead of the credits growing without end.

Calls or time (scheduling.share_unit; experiments/scheduling_sim.py, mixed-shapes profile at ~0.7 x capacity:
eager 0.546 req/s, compiled 0.73 req/s; p50 / p99 over unloaded for 512² | 768x512 | 1024²):
    eager     least-work 1.2/7.5 | 1.8/19.5 | 6.6/26.6   calls 0.25 2.0/5.8 | 2.4/6.1 | 3.6/6.2
              time 0.25  2.0/4.9 | 2.5/8.4  | 4.0/15.8  time 0.33  2.2/5.0 | 2.5/6.5 | 3.6/11.6
    compiled  least-work 1.2/8.8 | 1.3/10.1 | 2.2/9.5    calls 0.25 2.2/19.0 | 2.0/13.0 | 2.0/5.6
              time 0.25  1.6/8.7 | 1.7/10.0 | 2.3/9.3    calls 0.1  1.7/12.0 | 1.7/13.2 | 2.2/7.2
Neither unit is best in both modes. Eager, the small calls are host-bound (~70 ms whatever the batch) while a
batched 1024² call is GPU-bound (the sim's cost model: ~0.6 s at 8 images): in time the large group's calls cost ~8
small ones and a time share leaves it starved (p99 15.8x); a call share gives it what it needs. Compiled, every
call is GPU-bound and a call share hands the large group most of the GPU time (512² p99 19x); a time share keeps
the small sizes near least-work while still bounding the large one under continuous small traffic (at 0.9 req/s
least-work's 768x512 p99 is 37x, time 0.25: 19.5x). Hence share_unit auto: calls for an eager UNet, time for a
compiled one, with min_share 0.25 for both. Least work measured in seconds instead of pixels x rows changed p50
slightly in eager (1024² 3.6 -> 3.1 with calls 0.25) and nothing compiled: not adopted (pixels x rows needs no
measurement).
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
