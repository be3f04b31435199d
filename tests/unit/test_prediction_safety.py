"""The learned schedule's safety rule on generated outage traces that no model can learn:
never more than about 10 % later than the fixed schedule on median delay (issue 21, point
11).  A few seeds of each shape here; ``python3 -m benchmarks.safety`` sweeps many."""

from __future__ import annotations

import pytest

from benchmarks.safety import SHAPES, SPACING, compare
from benchmarks.traces import simulate, summarize
from dwcp._learning import GUARD_WINDOW, DelayGuard
from dwcp._prediction import Outage, SchedulePlan
from dwcp._recovery import RecoveryPolicy

OUTAGES = 40


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_predictive_is_never_much_later_than_fixed_on_median_delay(shape: str) -> None:
    fixed, learned = compare(shape, 0, OUTAGES)
    assert learned.median_delay <= fixed.median_delay * 1.10, (fixed, learned)


@pytest.mark.parametrize("seed", range(10))
def test_blocks_switching_between_outage_levels_stay_within_the_rule(seed: int) -> None:
    # The adversarial case: outage lengths switch between levels in blocks, so
    # what was learned keeps going out of date.  Without the guard, seeds 1 and 9 had a
    # median delay 18 % over the fixed schedule's.
    fixed, learned = compare("blocks", seed, 60)
    assert learned.median_delay <= fixed.median_delay * 1.10, (fixed, learned)


def _learned_plan() -> SchedulePlan:
    """A first cycle's plan over the configured 1, 2, 4 s whose search chose learned waits."""
    plan = SchedulePlan(tuple(Outage(6.0, 5.0) for _ in range(5)), (1.0, 2.0, 4.0), 0.0, 60.0,
                        0.0, 1.0, False)  # fmt: skip
    object.__setattr__(plan, "_searched", True)
    object.__setattr__(plan, "_result", (9.0,))  # one attempt, 9 s in
    return plan


def test_the_guard_sets_learned_schedules_aside_when_they_delay_more_than_fixed() -> None:
    guard = DelayGuard()
    # The configured schedule met three outages in five back within 0.2 s and two within
    # 4 s: the gap in their delays leaves room at the median.
    shorts = [Outage(w, 0.0, 1, w) for w in (0.2, 0.2, 0.2, 4.0, 4.0)]
    for k in range(40):
        guard.outage_ended(shorts[k % 5], [])
    assert guard.allows
    # Then a learned cycle found such an outage only at 9 s: about 8 s late, where the
    # configured attempt after 1 s would have found it.  One is enough.
    before = guard.suspensions
    guard.outage_ended(Outage(9.0, 0.0, 1, 9.0), [_learned_plan()])
    assert not guard.allows and guard.suspensions == before + 1
    # The configured schedule runs until its outages have made up for the late one (room at
    # the median and the delay budget), at the latest when it has left the window.
    waited = 0
    while not guard.allows and waited < GUARD_WINDOW:
        guard.outage_ended(shorts[waited % 5], [])
        waited += 1
    assert guard.allows and waited >= 10, waited


def test_the_guard_waits_for_room_at_the_median() -> None:
    guard = DelayGuard()
    # A few configured outages leave no room for two more late ones at their median ...
    for _ in range(5):
        guard.outage_ended(Outage(1.0, 0.0, 1, 1.0), [])
    assert not guard.allows
    # ... nor do any number of identical ones: half of their delays are over the median.
    for _ in range(GUARD_WINDOW):
        guard.outage_ended(Outage(1.0, 0.0, 1, 1.0), [])
    assert not guard.allows


def test_the_guard_keeps_learned_schedules_that_delay_no_more() -> None:
    guard = DelayGuard()
    # The configured schedule met three outages in five back after 8.95 s, by 9 s, two after
    # 9 s, by 15 s.
    configured = [Outage(9.0, 8.95, 4, 9.0)] * 3 + [Outage(15.0, 9.0, 5, 15.0)] * 2
    for k in range(40):
        guard.outage_ended(configured[k % 5], [])
    assert guard.allows
    before = guard.suspensions
    slow = Outage(9.0, 8.95, 1, 9.0)
    for _ in range(10):  # learned: found at 9 s, as the configured would
        guard.outage_ended(slow, [_learned_plan()])
        assert guard.allows
    assert guard.suspensions == before


# ``benchmarks.safety`` mixture seed 9, rounded to 10 ms: outages of about 15 s, 19 s and
# 25 s with a few of about 3 s, each starting at i * 1000 s plus a phase of the 10 s monitor.
MIXTURE_9 = [16.11, 14.63, 15.17, 15.26, 14.08, 3.2, 14.46, 15.36, 14.78, 15.38, 15.7, 15.08,
             14.81, 15.26, 14.07, 14.27, 24.5, 15.42, 15.24, 15.04, 3.43, 15.22, 24.73, 14.5,
             19.36, 3.07, 25.25, 15.36, 15.51, 3.08, 3.19, 2.99, 15.17, 14.64, 25.28, 19.03,
             15.54, 2.75, 19.43, 14.26, 14.25, 15.61, 25.47, 14.65, 18.46, 25.03, 15.67, 15.47,
             18.72, 14.18, 14.2, 24.32, 18.4, 24.67, 15.6, 14.08, 14.5, 14.87, 15.45, 15.37]  # fmt: skip
MIXTURE_9_PHASES = [6.47, 3.29, 1.17, 0.74, 8.08, 1.13, 2.78, 3.99, 6.69, 1.58, 5.41, 9.37, 5.94,
                    2.57, 0.3, 2.0, 1.57, 2.93, 2.17, 4.49, 4.0, 5.85, 0.39, 6.13, 9.78, 0.83,
                    9.24, 8.11, 0.17, 4.73, 6.0, 7.29, 7.32, 8.79, 1.08, 5.06, 7.95, 0.3, 1.92,
                    2.96, 8.08, 8.79, 7.09, 1.35, 2.57, 8.14, 4.57, 2.89, 5.18, 5.41, 1.92, 0.16,
                    4.23, 1.92, 9.8, 6.59, 1.87, 6.71, 1.17, 6.84]  # fmt: skip


def test_a_mixture_with_a_sparse_median_stays_within_the_rule() -> None:
    # The median of these fixed delays sits in a gap (1.17 s, then 1.49 s): one outage more
    # found late moves it by 14 %, so the guard must act before the first such outage, not
    # after three (it did before the median-room check: 1.17 s to 1.60 s, +36 %).
    starts = [i * SPACING + phase for i, phase in enumerate(MIXTURE_9_PHASES)]
    gaps = [0.0] * len(MIXTURE_9)
    fixed = summarize(*simulate(RecoveryPolicy(), MIXTURE_9, gaps, 10.0, starts=starts))
    learned = summarize(
        *simulate(RecoveryPolicy(predictive=True), MIXTURE_9, gaps, 10.0, starts=starts)
    )
    assert learned.median_delay <= fixed.median_delay * 1.10, (fixed, learned)


# ``benchmarks.safety`` alternation seed 30: outages of 8.25 s and 3.21 s in turn, each
# starting at i * 1000 s plus a phase of the 10 s monitor (rounded to 10 ms).
ALTERNATION_30_PHASES = [7.28, 4.77, 8.36, 9.82, 6.27, 2.51, 5.81, 2.72, 6.68, 3.23, 5.92, 7.7,
                         8.41, 0.85, 9.39, 1.77, 4.28, 9.4, 7.67, 0.45, 2.39, 5.95, 1.69, 6.71,
                         5.73, 7.79, 4.74, 8.47, 6.23, 5.93, 4.69, 2.81, 4.2, 7.64, 5.39, 8.32,
                         5.42, 3.41, 2.0, 4.78, 3.94, 3.57, 4.2, 0.91, 5.05, 4.06, 5.56, 7.51,
                         3.57, 3.73, 7.64, 5.14, 5.09, 5.59, 7.27, 4.74, 3.37, 2.86, 5.94, 0.6]  # fmt: skip


def test_an_alternation_of_two_lengths_stays_within_the_rule() -> None:
    # Learned schedules halve the failed attempts here, but a guard that judges only the
    # learned outages' own median lets the long ones be found late: before the median-room
    # check and the delay budget the median went from 1.30 s to 2.17 s (+67 %).
    durations = [3.21 if i % 2 else 8.25 for i in range(len(ALTERNATION_30_PHASES))]
    starts = [i * SPACING + phase for i, phase in enumerate(ALTERNATION_30_PHASES)]
    gaps = [0.0] * len(durations)
    fixed = summarize(*simulate(RecoveryPolicy(), durations, gaps, 10.0, starts=starts))
    learned = summarize(
        *simulate(RecoveryPolicy(predictive=True), durations, gaps, 10.0, starts=starts)
    )
    assert learned.median_delay <= fixed.median_delay * 1.10, (fixed, learned)
