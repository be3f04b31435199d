"""What a component with ``RecoveryPolicy(predictive=True)`` learns from its outages: the
outages themselves (``dwcp._prediction.RecoveryHistory``), how long an attempt takes, how
long after a cycle gave up the next one begins, and where the outages are shared.

``RestartSupervisor`` holds one only for a predictive policy, so the default fixed schedule
carries no statistics.  Not thread-safe: the manager calls it under its lock, and every call
is constant time plus a copy of the history at most (the guard's judgement at an outage's
end is bounded by its window: 60 outages of 16 points in two spreads, about 0.75 ms on the
development machine, once per outage, never per attempt); the search for a schedule is
``SchedulePlan.waits()``, which the recovery thread runs off the lock.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dwcp._prediction import (
    SMOOTHING_STEPS,
    WINDOW,
    Outage,
    RecoveryHistory,
    SchedulePlan,
    turnbull,
)

if TYPE_CHECKING:
    from dwcp._shared_history import SharedHistory

__all__ = ["DelayGuard", "LearnedTiming"]

#: Outages, configured and learned, that the guard judges together.
GUARD_WINDOW = 60
#: A delay counts as late when it exceeds the configured schedule's estimated median delay
#: by more than this share ...
GUARD_DELAY = 0.05
#: ... plus this many seconds.
GUARD_SLACK = 0.02
#: Learned schedules run only while this many more late outages would leave the median within
#: that bound ...
GUARD_ROOM = 2.0
#: ... and while their expected delay over the configured schedule's, summed over the window,
#: is at most this share of the configured schedule's.
GUARD_BUDGET = 0.05
#: Configured outages needed before their spread of return times is trusted.
GUARD_MIN = 3
# Points each outage's unknown return time is spread over.
_SPREAD = 16

# One outage as the guard keeps it: per way of spreading its return time, the
# (learned delay, configured delay, weight) points, weights summing to 1; and whether a
# learned schedule ran.
_Points = list[tuple[float, float, float]]


def _weighted_median(samples: Sequence[tuple[float, float]]) -> float:
    ordered = sorted(samples)
    total = sum(w for _, w in ordered)
    seen = 0.0
    for value, weight in ordered:
        seen += weight
        if seen >= total / 2:
            return value
    return ordered[-1][0] if ordered else 0.0


class DelayGuard:
    """Whether learned schedules may be used: the safety rule, checked on what they did.

    For each outage the guard keeps the delay (from the return to the attempt or check that
    found it) the schedule that ran had, and the delay the configured schedule had or would
    have had on it.  The return time is only known to lie after the last failed attempt and
    by the one that found it, so it is spread over that interval in two ways: evenly, and
    as the outages the configured schedule met spread theirs; every check must pass under
    both.  Over the last ``GUARD_WINDOW`` outages, learned schedules run only while (a) the
    outages whose delay exceeds the configured schedule's estimated median (times
    ``1 + GUARD_DELAY``, plus ``GUARD_SLACK`` seconds) leave room for ``GUARD_ROOM`` more
    before the median passes that bound, and (b) the learned schedules' expected extra
    delay over the configured one is at most ``GUARD_BUDGET`` of the configured schedule's
    total delay.  Both are judged after each outage; ``allows`` reads the verdict.
    """

    def __init__(self) -> None:
        self._window: deque[tuple[tuple[_Points, _Points], bool]] = deque(maxlen=GUARD_WINDOW)
        self._configured: deque[Outage] = deque(maxlen=WINDOW)
        self._allows = False  # no room yet
        #: Times learned schedules were set aside after being allowed.
        self.suspensions = 0

    @property
    def allows(self) -> bool:
        """Whether the next outage may use a learned schedule."""
        return self._allows

    def _spread(
        self, low: float, high: float, basis: Sequence[Outage]
    ) -> list[tuple[float, float]]:
        """Points (moment, weight) the return time is spread over in ``[low, high]``: as
        ``basis`` spreads it (evenly where it puts nothing, or without a basis)."""
        step = (high - low) / _SPREAD
        points = [low + step * (k + 0.5) for k in range(_SPREAD)]
        if basis:
            edges = sorted({0.0, low, high, *(v for o in basis for v in (o.not_before, o.until))})
            mass = turnbull(basis, edges, iterations=SMOOTHING_STEPS)
            weights = []
            for at in points:
                segment = min(max(bisect.bisect_left(edges, at) - 1, 0), len(mass) - 1)
                width = edges[segment + 1] - edges[segment] if mass else 0.0
                weights.append(mass[segment] / width if width > 0 else 0.0)
            total = sum(weights)
            if total > 1e-12:
                return [(at, w / total) for at, w in zip(points, weights)]
        return [(at, 1.0 / _SPREAD) for at in points]

    def outage_ended(self, outage: Outage, plans: Sequence[SchedulePlan]) -> None:
        """Judge ``outage``, whose cycles were planned by ``plans`` (a learned schedule ran
        where a plan's ``result`` is not None)."""
        learned = any(p.result is not None for p in plans)
        basis = list(self._configured) if len(self._configured) >= GUARD_MIN else []
        if learned:
            plan = plans[0]  # the configured schedule is laid out from the first cycle on
            low, high = max(outage.not_before, plan.elapsed), outage.until
            probes = plan.configured_probes(high)
        else:
            # The configured schedule ran: its outages tell, without a learned schedule's
            # own attempts shaping them, when the component comes back.
            self._configured.append(outage)
            low, high = outage.not_before, outage.until
            probes = [high]
        if high <= low:
            return

        def delays(points: list[tuple[float, float]]) -> _Points:
            # (this schedule's delay, the configured schedule's, weight) for each return time
            return [
                (high - at, probes[min(bisect.bisect_left(probes, at), len(probes) - 1)] - at, w)
                for at, w in points
            ]

        spreads = (delays(self._spread(low, high, [])), delays(self._spread(low, high, basis)))
        self._window.append((spreads, learned))
        allows = self._judge()
        if self._allows and not allows:
            self.suspensions += 1
        self._allows = allows

    def _judge(self) -> bool:
        count = len(self._window)
        for way in (0, 1):
            points = [p for entry in self._window for p in entry[0][way]]
            bound = _weighted_median([(f, w) for _, f, w in points]) * (1 + GUARD_DELAY)
            bound += GUARD_SLACK
            late = sum(w for mine, _, w in points if mine > bound)
            if late + GUARD_ROOM > count / 2:
                return False
            extra = sum((mine - theirs) * w for mine, theirs, w in points)
            if extra > GUARD_BUDGET * sum(theirs * w for _, theirs, w in points):
                return False
        return True


class LearnedTiming:
    """One component's learned recovery timing; times come from the caller."""

    def __init__(self) -> None:
        self.history = RecoveryHistory()
        # When the current outage's latest attempt began, and its last failed one; the
        # outage ended after the latter.
        self._attempt_at: float | None = None
        self._failed_at: float | None = None
        self._attempt_duration = 0.0
        # How long after a cycle gave up the next one began (the monitor's next pass).
        self._pause: float | None = None
        # Where learned outages are shared with other processes (a cluster's Redis).
        self._shared: SharedHistory | None = None
        #: Sets learned schedules aside when they delay more than the configured one did.
        self.guard = DelayGuard()
        # The plans of the current outage's cycles, judged by the guard when it ends.
        self._plans: list[SchedulePlan] = []

    def share(self, shared: SharedHistory) -> None:
        """Take the outages read from ``shared`` before the next schedule, and push each
        outage learned here to it (neither does I/O)."""
        self._shared = shared

    def _learn(self, outage: Outage) -> None:
        self._absorb()
        self.history.record(outage)
        if self._shared is not None:
            self._shared.push(outage)
        plans, self._plans = self._plans, []
        self.guard.outage_ended(outage, plans)

    def _absorb(self) -> None:
        if self._shared is not None:
            taken = self._shared.take()
            if taken:
                self.history.preload(taken)

    def recovered(self, now: float, down_since: float | None, attempt: int | None) -> None:
        """A verified recovery at ``now``: learn the outage begun at ``down_since`` (if
        known); ``attempt`` is the attempt that succeeded (None: a health check found it)."""
        failed_at, self._failed_at = self._failed_at, None
        started_at, self._attempt_at = self._attempt_at, None
        if down_since is None:
            return
        total = max(now - down_since, 0.0)
        back_by = total
        if attempt is not None and started_at is not None:
            back_by = min(max(started_at - down_since, 0.0), total)
        not_before = 0.0
        if failed_at is not None:
            not_before = min(max(failed_at - down_since, 0.0), back_by)
        self._learn(Outage(total, not_before, attempt, back_by))

    def healed(self, now: float, down_since: float | None) -> None:
        """A check found the component healthy between cycles (after one gave up)."""
        failed_at, self._failed_at = self._failed_at, None
        self._attempt_at = None
        if down_since is None:
            return
        total = max(now - down_since, 0.0)
        not_before = 0.0 if failed_at is None else min(max(failed_at - down_since, 0.0), total)
        self._learn(Outage(total, not_before, None, total))

    def attempt_started(self, at: float) -> None:
        """An attempt of the current outage begins (acts) at ``at``."""
        self._attempt_at = at

    def attempt_failed(self, now: float) -> None:
        """The attempt begun last failed at ``now``: the outage ends after it."""
        if self._attempt_at is not None:
            self._failed_at = self._attempt_at
            took = max(now - self._attempt_at, 0.0)
            # A smoothed duration, so a learned schedule can start each attempt on time.
            self._attempt_duration += (took - self._attempt_duration) / 4

    def plan(
        self, now: float, down_since: float, configured: Sequence[float], cap: float
    ) -> SchedulePlan | None:
        """The snapshot a learned schedule for the cycle admitted at ``now`` is searched
        from, or None for ``configured`` (see ``RecoveryHistory.plan``)."""
        self._absorb()
        if self._attempt_at is not None and self._failed_at is not None:
            seen = max(now - self._failed_at - self._attempt_duration, 0.0)
            self._pause = seen if self._pause is None else self._pause + (seen - self._pause) / 4
        new_outage = self._attempt_at is None
        plan = self.history.plan(
            configured,
            max(now - down_since, 0.0),
            cap,
            min(self._attempt_duration, cap),
            new_outage=new_outage,
            pause=self._pause,
        )
        if new_outage:
            self._plans = []
        if plan is not None:
            self._plans.append(plan)
        if not self.guard.allows:
            return None  # set aside: the configured schedule (the plan is still judged)
        return plan
