"""Recovery timing learned from past outages: when a component has usually come back.

``RecoveryHistory`` keeps the recent outages of one component (``dwcp._estimate.Outage``).
A run of outages beyond the learned range on one side is taken as a change of pattern: the
older history is dropped and the configured schedule is used until enough new outages are
known.  Every ``EXPLORE_EVERY``-th outage's cycle makes the configured first attempt, since
only an earlier attempt can show that the component now comes back sooner.
``RecoveryHistory`` is not thread-safe: the manager calls it under its lock, when a cycle
begins (``plan``: a snapshot of the outages, no search) and when an outage ends
(``record``).  The search, ``SchedulePlan.waits()`` (``dwcp._schedule_choice``, over the
cost model of ``dwcp._schedule_model``), runs on the recovery thread, off the lock, from
that snapshot.  This module re-exports the names of those modules that tests and the
learning code use.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from dwcp._estimate import Outage, turnbull, weighted_quantile
from dwcp._schedule_choice import (
    FOLDS,
    HELD_OUT_DELAY,
    HELD_OUT_LATE,
    HELD_OUT_SAVING,
    MIN_SAMPLES,
    MIN_SAVED,
    MIN_SAVING,
    SchedulePlan,
    _fold,
    _late,
    _Plan,
)
from dwcp._schedule_model import (
    DELAY_WEIGHT,
    GRID,
    LABELS,
    MERGE,
    SMOOTHING_STEPS,
    _candidates,
    _Model,
)

__all__ = [
    "CHANGE_RUN",
    "DELAY_WEIGHT",
    "EXPLORE_EVERY",
    "FOLDS",
    "GRID",
    "HELD_OUT_DELAY",
    "HELD_OUT_LATE",
    "HELD_OUT_SAVING",
    "LABELS",
    "MERGE",
    "MIN_SAMPLES",
    "MIN_SAVED",
    "MIN_SAVING",
    "SMOOTHING_STEPS",
    "WINDOW",
    "Outage",
    "RecoveryHistory",
    "SchedulePlan",
    "_Model",
    "_Plan",
    "_candidates",
    "_fold",
    "_late",
    "turnbull",
    "weighted_quantile",
]

#: Outages kept; older ones are forgotten so the history follows slow drift.
WINDOW = 100
#: Consecutive outages beyond the learned range, on one side, that mean the pattern changed.
CHANGE_RUN = 3
#: Every this many outages a cycle runs the configured schedule (see the module docstring).
EXPLORE_EVERY = 5


class RecoveryHistory:
    """Recent outages of one component and the attempt schedule they suggest."""

    def __init__(self) -> None:
        self._outages: deque[Outage] = deque(maxlen=WINDOW)
        # The current run of outages beyond the learned range, and its side (-1 or +1).
        self._run: list[Outage] = []
        self._run_side = 0
        self._since_explore = 0
        self._explore_next = False
        #: Changes of pattern seen so far.
        self.regime_changes = 0

    def __len__(self) -> int:
        return len(self._outages)

    @property
    def outages(self) -> tuple[Outage, ...]:
        """The outages kept, oldest first."""
        return tuple(self._outages)

    def preload(self, outages: Sequence[Outage]) -> None:
        """Put outages learned elsewhere (another process, through Redis) before the ones
        known here, oldest first, as far as the window holds; no change of pattern is judged
        on them."""
        known = list(self._outages)
        self._outages.clear()
        self._outages.extend([*outages, *known][-WINDOW:])

    def record(self, outage: Outage) -> bool:
        """Add one outage; returns True when it completed a change of pattern."""
        if not isinstance(outage, Outage):
            raise TypeError(f"outage must be an Outage, got {type(outage).__name__}")
        side = self._side(outage)
        if side == 0:
            # Back within the range: a run of outliers was noise, and they count as outages.
            self._outages.extend(self._run)
            self._run.clear()
            self._run_side = 0
        elif side is not None:
            if side != self._run_side:
                self._outages.extend(self._run)
                self._run.clear()
                self._run_side = side
            # Held apart, so the outliers do not widen the range they are judged against.
            self._run.append(outage)
            # Back sooner than ever seen: look earlier on the next outage too.
            self._explore_next = side < 0
            if len(self._run) >= CHANGE_RUN:
                self._outages.clear()
                self._outages.extend(self._run)
                self._run.clear()
                self._run_side = 0
                self._explore_next = False
                self.regime_changes += 1
                return True
            return False
        self._outages.append(outage)
        return False

    def _side(self, outage: Outage) -> int | None:
        """-1 or +1 when the outage lies surely below or above the learned range, 0 when it
        surely overlaps it, None when its interval cannot tell."""
        if len(self._outages) < MIN_SAMPLES:
            return 0
        longest = max(o.until for o in self._outages)
        # A fine even grid for the range: the estimate needs no schedule here.
        edges = [longest * k / 64 for k in range(65)]
        mass = turnbull(self._outages, edges)
        low = weighted_quantile(edges, mass, 0.05)
        high = weighted_quantile(edges, mass, 0.95)
        margin = max(high - low, 0.5 * weighted_quantile(edges, mass, 0.5)) / 2
        if outage.until < low - margin:
            return -1
        if outage.not_before > high + margin:
            return 1
        if outage.until <= high + margin:
            if outage.not_before >= low - margin:
                return 0
            # Back within the range, but nothing says it was not back sooner: no evidence
            # about a faster pattern, evidence against a slower one.
            return None if self._run_side < 0 else 0
        return None

    def schedule(
        self,
        configured: Sequence[float],
        elapsed: float,
        cap: float,
        attempt_duration: float = 0.0,
        *,
        new_outage: bool = True,
        pause: float | None = None,
    ) -> tuple[float, ...] | None:
        """``plan(...)`` and its ``waits()`` at once: waits for a cycle starting ``elapsed``
        seconds into an outage, or None for the configured schedule (see ``plan``)."""
        plan = self.plan(
            configured, elapsed, cap, attempt_duration, new_outage=new_outage, pause=pause
        )
        return None if plan is None else plan.waits()

    def plan(
        self,
        configured: Sequence[float],
        elapsed: float,
        cap: float,
        attempt_duration: float = 0.0,
        *,
        new_outage: bool = True,
        pause: float | None = None,
    ) -> SchedulePlan | None:
        """What a cycle starting ``elapsed`` seconds into an outage needs to learn its waits:
        a snapshot of the outages kept, taken in constant time plus a copy (the caller may
        hold a lock), or None for the configured schedule (too little history).  The
        search itself is ``SchedulePlan.waits()``, which touches no state of this history.

        ``configured`` are the policy's waits, ``cap`` bounds every wait, and
        ``attempt_duration`` (how long a failed attempt takes) places the configured
        attempts where they would really begin; ``new_outage`` says this is an outage's
        first cycle (it counts towards the next exploring cycle); ``pause`` is how long
        after a cycle gave up the next one begins (the first configured wait if unknown).
        """
        if not configured:
            raise ValueError("configured schedule is empty")
        exploring = False
        if new_outage:
            self._since_explore += 1
            if self._explore_next or self._since_explore >= EXPLORE_EVERY:
                self._since_explore = 0
                self._explore_next = False
                exploring = True
        if len(self._outages) < MIN_SAMPLES:
            return None
        return SchedulePlan(
            tuple(self._outages),
            tuple(configured),
            elapsed,
            cap,
            attempt_duration,
            configured[0] if pause is None else pause,
            exploring,
        )
