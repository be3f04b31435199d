"""What a component with ``RecoveryPolicy(predictive=True)`` learns from its outages: the
outages themselves (``dwcp._prediction.RecoveryHistory``), how long an attempt takes, how
long after a cycle gave up the next one begins, and where the outages are shared.

``RestartSupervisor`` holds one only for a predictive policy, so the default fixed schedule
carries no statistics.  Not thread-safe: the manager calls it under its lock, and every call
is constant time plus a copy of the history at most; the search for a schedule is
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

#: Outages in which a learned schedule ran that the guard judges together.
GUARD_WINDOW = 10
#: ... and how many it needs before it judges.
GUARD_MIN = 3
#: Learned schedules are set aside when their median or mean delay on those outages exceeds the
#: configured schedule's on the same outages by more than this share ...
GUARD_DELAY = 0.05
#: ... plus this many seconds.
GUARD_SLACK = 0.02
#: Outages that then run the configured schedule before a learned one may be tried again.
SUSPEND = 25
# Points each learned outage's unknown return time is spread over.
_SPREAD = 16


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

    After each outage in which a cycle ran a learned schedule, the guard compares the delay
    it had (from the return to the attempt or check that found it) with the delay the
    configured schedule would have had on the same outage.  The return time is only known
    to lie after the last failed attempt and by the one that found it, so it is spread over
    that interval as the outages the configured schedule met spread it (a learned
    schedule's own outages would confirm what it expected; evenly until ``GUARD_MIN`` of
    them are known).  When, over the last ``GUARD_WINDOW`` such outages (at least
    ``GUARD_MIN``), the learned schedules' median or mean delay exceeds the configured
    schedule's by more than ``GUARD_DELAY`` (plus ``GUARD_SLACK`` seconds), the next
    ``SUSPEND`` outages run the configured schedule, whatever the estimate promises.
    """

    def __init__(self) -> None:
        self._window: deque[tuple[list[tuple[float, float]], list[tuple[float, float]]]] = deque(
            maxlen=GUARD_WINDOW
        )
        self._suspended = 0
        self._configured: deque[Outage] = deque(maxlen=WINDOW)
        #: Times learned schedules were set aside.
        self.suspensions = 0

    @property
    def allows(self) -> bool:
        """Whether the next outage may use a learned schedule."""
        return self._suspended == 0

    def outage_ended(self, outage: Outage, plans: Sequence[SchedulePlan]) -> None:
        """Judge ``outage``, whose cycles were planned by ``plans`` (a learned schedule ran
        where a plan's ``result`` is not None)."""
        if not any(p.result is not None for p in plans):
            # The configured schedule ran: its outages tell, without a learned schedule's
            # own attempts shaping them, when the component comes back.
            self._configured.append(outage)
            if self._suspended:
                self._suspended -= 1
            return
        plan = plans[0]  # the configured schedule is laid out from the first cycle on
        low, high = max(outage.not_before, plan.elapsed), outage.until
        if high <= low:
            return
        probes = plan.configured_probes(high)
        # Spread by the outages the configured schedule met (a learned schedule's wide
        # intervals would spread its own outages where it expected them); evenly until
        # there are enough.
        basis = list(self._configured) if len(self._configured) >= GUARD_MIN else []
        edges = sorted({0.0, low, high, *(v for o in basis for v in (o.not_before, o.until))})
        mass = turnbull(basis, edges, iterations=SMOOTHING_STEPS) if basis else []
        learned: list[tuple[float, float]] = []
        configured: list[tuple[float, float]] = []
        step = (high - low) / _SPREAD
        for k in range(_SPREAD):
            at = low + step * (k + 0.5)
            segment = min(max(bisect.bisect_left(edges, at) - 1, 0), len(mass) - 1)
            width = edges[segment + 1] - edges[segment] if mass else 0.0
            weight = mass[segment] / width * step if width > 0 else 0.0
            learned.append((high - at, weight))
            found = probes[min(bisect.bisect_left(probes, at), len(probes) - 1)]
            configured.append((max(found - at, 0.0), weight))
        if sum(w for _, w in learned) <= 1e-12:
            learned = [(d, 1.0) for d, _ in learned]
            configured = [(d, 1.0) for d, _ in configured]
        total = sum(w for _, w in learned)
        self._window.append(
            ([(d, w / total) for d, w in learned], [(d, w / total) for d, w in configured])
        )
        if len(self._window) < GUARD_MIN:
            return
        mine = [x for pair in self._window for x in pair[0]]
        theirs = [x for pair in self._window for x in pair[1]]
        count = len(self._window)
        # The median, and the mean: a few outages found much later move the mean first.
        worse = _weighted_median(mine) > _weighted_median(theirs) * (1 + GUARD_DELAY) + GUARD_SLACK
        worse |= sum(d * w for d, w in mine) / count > (
            sum(d * w for d, w in theirs) / count * (1 + GUARD_DELAY) + GUARD_SLACK
        )
        if worse:
            self._suspended = SUSPEND
            self.suspensions += 1
            self._window.clear()


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
