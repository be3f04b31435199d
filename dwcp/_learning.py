"""What a component with ``RecoveryPolicy(predictive=True)`` learns from its outages: the
outages themselves (``dwcp._prediction.RecoveryHistory``), how long an attempt takes, how
long after a cycle gave up the next one begins, and where the outages are shared.

``RestartSupervisor`` holds one only for a predictive policy, so the default fixed schedule
carries no statistics.  Not thread-safe: the manager calls it under its lock, and every call
is constant time plus a copy of the history at most; the search for a schedule is
``SchedulePlan.waits()``, which the recovery thread runs off the lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dwcp._prediction import Outage, RecoveryHistory, SchedulePlan

if TYPE_CHECKING:
    from dwcp._shared_history import SharedHistory

__all__ = ["LearnedTiming"]


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

    def share(self, shared: SharedHistory) -> None:
        """Take the outages read from ``shared`` before the next schedule, and push each
        outage learned here to it (neither does I/O)."""
        self._shared = shared

    def _learn(self, outage: Outage) -> None:
        self._absorb()
        self.history.record(outage)
        if self._shared is not None:
            self._shared.push(outage)

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
        return self.history.plan(
            configured,
            max(now - down_since, 0.0),
            cap,
            min(self._attempt_duration, cap),
            new_outage=self._attempt_at is None,
            pause=self._pause,
        )
