"""Recovery timing learned from past outages: when a component has usually come back.

Each outage is known only as an interval: the component recovered after its last failed
attempt (``not_before``) and by the attempt or check that found it healthy
(``recovered_after``), both counted from its first unhealthy check.  ``RecoveryHistory``
keeps the recent outages, proposes attempt times at quantiles of their recovery times, and
accepts a proposal only when, replayed over those outages, it needs fewer failed attempts
than the configured schedule without recovering later in the median or giving up more often.
A run of outages outside the learned range on one side is taken as a change of pattern: the
older history is dropped and the configured schedule is used until enough new outages are
known.  Not thread-safe: the manager calls it under its lock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MIN_SAMPLES", "Outage", "RecoveryHistory", "Replay", "replay"]

#: Outages needed before a learned schedule may be used.
MIN_SAMPLES = 5
#: Outages kept; older ones are forgotten so the history follows slow drift.
WINDOW = 50
#: Consecutive outages beyond the learned range, on one side, that mean the pattern changed.
CHANGE_RUN = 3
#: Every this many outages a cycle runs the configured schedule: only an attempt earlier than
#: the learned ones can show that the component now comes back sooner.
EXPLORE_EVERY = 5
# Quantile families for the attempts before the last: the first at LEVEL, the rest spread
# towards the maximum with the exponent.
_FIRST_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_SPREADS = (0.5, 1.0, 2.0)
# The last attempt goes this much past the longest known outage.
_LAST_MARGIN = 1.1


@dataclass(frozen=True)
class Outage:
    """One outage: it ended after ``not_before`` and by ``recovered_after`` seconds.

    Both count from the first unhealthy check; ``not_before`` is the last failed attempt (0
    when the first attempt succeeded) and ``attempt`` the attempt of its cycle that succeeded
    (None when a health check found the component healthy after a cycle gave up).
    """

    recovered_after: float
    not_before: float = 0.0
    attempt: int | None = None

    def __post_init__(self) -> None:
        for name in ("recovered_after", "not_before"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if self.not_before > self.recovered_after:
            raise ValueError(
                f"not_before ({self.not_before!r}) is after recovered_after "
                f"({self.recovered_after!r})"
            )

    @property
    def estimate(self) -> float:
        """The single best guess of when it came back.

        A failed attempt brackets the return, so the middle of the bracket; without one, only
        the upper bound is known and is used as is (halving it would pull the schedule
        earlier on every quick success and cost failed attempts).
        """
        if self.not_before > 0:
            return (self.not_before + self.recovered_after) / 2
        return self.recovered_after


@dataclass(frozen=True)
class Replay:
    """How a schedule would have done over the recorded outages."""

    failed_attempts: float  # mean per outage
    median_delay: float  # from the estimated return to the successful attempt; inf if given up
    given_up: int


def quantile(ordered: Sequence[float], level: float) -> float:
    """The ``level`` quantile of sorted ``ordered``, interpolated linearly (numpy's default)."""
    if not ordered:
        raise ValueError("quantile of no values")
    position = level * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def replay(targets: Sequence[float], returns: Sequence[float]) -> Replay:
    """Replay attempt times ``targets`` (ascending) over the return times ``returns``."""
    failed = 0
    given_up = 0
    delays: list[float] = []
    for back in returns:
        for index, target in enumerate(targets):
            if target >= back:
                failed += index
                delays.append(target - back)
                break
        else:
            failed += len(targets)
            given_up += 1
            delays.append(math.inf)
    delays.sort()
    return Replay(failed / len(returns), quantile(delays, 0.5), given_up)


class RecoveryHistory:
    """Recent outages of one component and the attempt schedule they suggest."""

    def __init__(self) -> None:
        self._outages: deque[Outage] = deque(maxlen=WINDOW)
        # The current run of outages beyond the learned range: (side, outage).
        self._run: list[Outage] = []
        self._run_side = 0
        self._since_explore = 0
        self._explore_next = False
        self.regime_changes = 0

    def __len__(self) -> int:
        return len(self._outages)

    @property
    def outages(self) -> tuple[Outage, ...]:
        """The outages kept, oldest first."""
        return tuple(self._outages)

    def record(self, outage: Outage) -> bool:
        """Add one outage; returns True when it completed a change of pattern."""
        if not isinstance(outage, Outage):
            raise TypeError(f"outage must be an Outage, got {type(outage).__name__}")
        changed = False
        side = self._side(outage)
        if side == 0:
            self._run.clear()
            self._run_side = 0
        elif side is not None:
            if side != self._run_side:
                self._run.clear()
                self._run_side = side
            self._run.append(outage)
            # An outage that came back sooner than ever seen: look earlier next time.
            self._explore_next = side < 0
            if len(self._run) >= CHANGE_RUN:
                self._outages.clear()
                self._outages.extend(self._run)
                self._run.clear()
                self._run_side = 0
                self.regime_changes += 1
                changed = True
                self._explore_next = False
                return changed
        self._outages.append(outage)
        return changed

    def _side(self, outage: Outage) -> int | None:
        """-1 or +1 when the outage lies surely below or above the learned range, 0 when it
        surely overlaps it, None when its interval cannot tell."""
        if len(self._outages) < MIN_SAMPLES:
            return 0
        ordered = sorted(o.estimate for o in self._outages)
        low, high = quantile(ordered, 0.05), quantile(ordered, 0.95)
        margin = max(high - low, 0.5 * quantile(ordered, 0.5)) / 2
        if outage.recovered_after < low - margin:
            return -1
        if outage.not_before > high + margin:
            return 1
        if outage.not_before >= low - margin and outage.recovered_after <= high + margin:
            return 0
        if outage.recovered_after <= high + margin:
            # Came back within the range, but no earlier attempt says it was not sooner:
            # no evidence either way about a faster pattern, evidence against a slower one.
            return None if self._run_side < 0 else 0
        return None

    def schedule(
        self, configured: Sequence[float], elapsed: float, cap: float
    ) -> tuple[float, ...] | None:
        """Waits for a cycle starting ``elapsed`` seconds into an outage, or None.

        ``configured`` are the policy's waits (their count bounds the attempts) and ``cap``
        bounds every wait.  None means: use the configured schedule (too little history,
        an exploring cycle, or no learned schedule beats it on the recorded outages).
        """
        if not configured:
            raise ValueError("configured schedule is empty")
        if elapsed <= 0:
            # A new outage: counts towards the next exploring cycle.
            self._since_explore += 1
            if self._explore_next or self._since_explore >= EXPLORE_EVERY:
                self._since_explore = 0
                self._explore_next = False
                return None
        returns = sorted(o.estimate for o in self._outages if o.estimate > elapsed)
        if len(returns) < MIN_SAMPLES:
            return None
        fixed: list[float] = []
        at = elapsed
        for wait in configured:
            at += wait
            fixed.append(at)
        baseline = replay(fixed, returns)
        count = len(configured)
        last = max(returns[-1] * _LAST_MARGIN, fixed[-1])
        best: tuple[Replay, tuple[float, ...]] | None = None
        for first in _FIRST_LEVELS:
            for spread in _SPREADS:
                levels = [
                    first + (1 - first) * (i / max(count - 1, 1)) ** spread
                    for i in range(count - 1)
                ]
                targets = _capped([quantile(returns, lv) for lv in levels] + [last], elapsed, cap)
                score = replay(targets, returns)
                if (
                    score.given_up > baseline.given_up
                    or score.median_delay > baseline.median_delay + 1e-9
                    or score.failed_attempts >= baseline.failed_attempts
                ):
                    continue
                if best is None or (score.failed_attempts, score.median_delay) < (
                    best[0].failed_attempts,
                    best[0].median_delay,
                ):
                    best = (score, targets)
        if best is None:
            return None
        waits: list[float] = []
        at = elapsed
        for target in best[1]:
            waits.append(target - at)
            at = target
        return tuple(waits)


def _capped(targets: list[float], elapsed: float, cap: float) -> tuple[float, ...]:
    """Ascending distinct attempt times after ``elapsed``, no two more than ``cap`` apart."""
    out: list[float] = []
    at = elapsed
    for target in sorted(targets):
        if target <= at + 1e-9 and out:
            continue  # the same moment twice: one attempt is enough
        at = min(max(target, at), at + cap)
        out.append(at)
    return tuple(out)
