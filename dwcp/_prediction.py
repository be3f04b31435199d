"""Recovery timing learned from past outages: when a component has usually come back.

An outage is only known as an interval: the component came back after its last failed
attempt (``not_before``) and by the attempt or check that found it healthy (``back_by``),
both counted from its first unhealthy check.  ``RecoveryHistory`` keeps the recent outages
and estimates how their return times fall between the moments that matter: the configured
cycle's attempts, then the attempts of later cycles seen in past outages (a cycle that
gives up is followed by another).  The estimate is Turnbull's self-consistency algorithm,
the nonparametric maximum-likelihood estimate for interval-censored data, so a quick
success, which says only "back by then", is neither taken as the return time nor ignored.

A learned cycle keeps the moments by which at least ``ATTEMPT_MASS`` of the outages have
come back since the previous kept one, allowing a rule-of-three margin for how few outages
can tell, and skips the rest, up to the policy's number of attempts.  It never ends before
the configured cycle would, and it is used only when it saves at least ``MIN_SAVING`` of the
expected failed attempts.  An outage is then found back at the same moment as with the
configured schedule or at the next kept one.  A run of outages beyond the learned range on
one side is taken as a change of pattern: the older history is dropped and the configured
schedule is used until enough new outages are known.  Every ``EXPLORE_EVERY``-th outage runs
the configured schedule, since only an earlier attempt can show that the component now comes
back sooner.  Not thread-safe: the manager calls it under its lock, when a cycle begins and
when an outage ends; with ``WINDOW`` outages kept, each call costs
about 10 ms of pure Python on the development machine.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ATTEMPT_MASS",
    "CHANGE_RUN",
    "EXPLORE_EVERY",
    "MIN_SAMPLES",
    "Outage",
    "RecoveryHistory",
    "turnbull",
    "weighted_quantile",
]

#: Outages needed before a learned schedule may be used.
MIN_SAMPLES = 5
#: Outages kept; older ones are forgotten so the history follows slow drift.
WINDOW = 100
#: Consecutive outages beyond the learned range, on one side, that mean the pattern changed.
CHANGE_RUN = 3
#: Every this many outages a cycle runs the configured schedule (see the module docstring).
EXPLORE_EVERY = 5
#: A point of the configured timeline is kept when at least this share of the outages came
#: back since the previous kept point.
ATTEMPT_MASS = 0.05
#: A learned schedule is used only when it is expected to save at least this share of the
#: failed attempts.
MIN_SAVING = 0.3
# The rule-of-three constant: with n informative outages and none in a stretch, its share
# may still be up to about this over n.
_CONFIDENCE = 1.0
_EM_ITERATIONS = 100
_EM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Outage:
    """One outage, in seconds from its first unhealthy check.

    ``recovered_after`` is when it was verified healthy; the component came back after
    ``not_before`` (when its last failed attempt began, 0 if none failed) and by ``back_by``
    (when the successful attempt began, or the check that found it healthy; defaults to
    ``recovered_after``).  ``attempt`` is the attempt of its cycle that succeeded (None when
    a health check found it healthy after a cycle gave up).
    """

    recovered_after: float
    not_before: float = 0.0
    attempt: int | None = None
    back_by: float | None = None

    def __post_init__(self) -> None:
        if self.back_by is None:
            object.__setattr__(self, "back_by", self.recovered_after)
        for name in ("recovered_after", "not_before", "back_by"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if not self.not_before <= self.until <= self.recovered_after:
            raise ValueError(
                f"need not_before <= back_by <= recovered_after, got {self.not_before!r}, "
                f"{self.back_by!r}, {self.recovered_after!r}"
            )

    @property
    def until(self) -> float:
        """``back_by`` as a float: the latest moment the component can have come back."""
        assert self.back_by is not None
        return self.back_by


def turnbull(outages: Sequence[Outage], edges: Sequence[float]) -> list[float]:
    """The NPMLE of the return-time distribution over the segments ``(edges[k], edges[k+1]]``.

    ``edges`` ascend from 0; an outage's endpoints count at their nearest edge.  Each outage shares its unit of mass
    among the segments its interval overlaps in proportion to their current probabilities,
    until those stop changing (Turnbull's self-consistency algorithm, 1976).
    """
    if not outages:
        raise ValueError("no outages to estimate from")
    segments = len(edges) - 1
    if segments < 1:
        raise ValueError("edges must hold at least two values")
    # Each endpoint snaps to its nearest edge: attempts start a little after the schedule's
    # nominal times (the previous attempt's own duration), and that drift must not count
    # as evidence for the next segment.
    spans: list[range] = []
    for o in outages:
        low = _nearest(edges, o.not_before)
        high = max(_nearest(edges, o.until), low + 1)
        spans.append(range(low, min(high, segments)))
    mass = [1.0 / segments] * segments
    share = 1.0 / len(outages)
    for _ in range(_EM_ITERATIONS):
        updated = [0.0] * segments
        for span in spans:
            covered = sum(mass[k] for k in span)
            for k in span:
                updated[k] += share * (mass[k] / covered if covered > 0 else 1.0 / len(span))
        change = max(abs(a - b) for a, b in zip(updated, mass))
        mass = updated
        if change < _EM_TOLERANCE:
            break
    return mass


def _nearest(edges: Sequence[float], value: float) -> int:
    index = bisect.bisect_left(edges, value)
    if index == len(edges):
        return index - 1
    if index > 0 and value - edges[index - 1] < edges[index] - value:
        return index - 1
    return index


def weighted_quantile(edges: Sequence[float], mass: Sequence[float], level: float) -> float:
    """The ``level`` quantile of the distribution spreading ``mass[k]`` evenly over
    ``(edges[k], edges[k+1]]``."""
    if not mass:
        raise ValueError("quantile of no values")
    goal = level * sum(mass)
    cumulative = 0.0
    for k, weight in enumerate(mass):
        if weight > 0 and cumulative + weight >= goal - 1e-12:
            part = min(max((goal - cumulative) / weight, 0.0), 1.0)
            return edges[k] + part * (edges[k + 1] - edges[k])
        cumulative += weight
    return edges[-1]


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
    ) -> tuple[float, ...] | None:
        """Waits for a cycle starting ``elapsed`` seconds into an outage, or None.

        ``configured`` are the policy's waits, ``cap`` bounds every wait, and
        ``attempt_duration`` (how long a failed attempt takes) places the configured
        attempts where they would really begin.  The learned cycle keeps the configured
        attempts by which at least ``ATTEMPT_MASS`` of the outages came back since the
        previous kept one, and always the last, so it ends when the configured cycle would.
        None means: run the configured schedule (too little history, an exploring cycle,
        nothing worth skipping).  ``new_outage`` says this is an outage's first cycle.
        """
        if not configured:
            raise ValueError("configured schedule is empty")
        if new_outage:
            self._since_explore += 1
            if self._explore_next or self._since_explore >= EXPLORE_EVERY:
                self._since_explore = 0
                self._explore_next = False
                return None
        if len(self._outages) < MIN_SAMPLES:
            return None
        starts: list[float] = []
        at = elapsed
        for index, wait in enumerate(configured):
            at += min(wait, cap) + (attempt_duration if index else 0.0)
            starts.append(at)
        # Later moments at which attempts or checks were made: the cycles that followed a
        # give-up.  A learned cycle may reach one of them instead of trying at the end of its
        # own cycle, where those outages never ended.
        later = _moments(
            v for o in self._outages for v in (o.not_before, o.until) if v > starts[-1] + 0.05
        )
        points = [*starts, *later]
        horizon = max(max(o.until for o in self._outages), points[-1]) + 1.0
        edges = [0.0, *points, horizon] if elapsed <= 0 else [0.0, elapsed, *points, horizon]
        mass = turnbull(self._outages, edges)
        first = len(edges) - len(points) - 2  # the segment ending at points[0]
        before = sum(mass[:first])
        if before >= 1 - 1e-9:
            return None  # every known outage had ended by now: nothing to go on
        informed = _informed(self._outages, edges)
        kept: list[int] = []
        gathered = 0.0
        evidence = len(self._outages)
        for index in range(len(points)):
            gathered += mass[first + index]
            evidence = min(evidence, informed[first + index])
            # Skip an attempt only when even the upper end of what the outages allow (a
            # rule-of-three bound on few informative ones) stays under the threshold.
            bound = gathered / (1 - before) + _CONFIDENCE / max(evidence, 1)
            if bound >= ATTEMPT_MASS:
                kept.append(index)
                gathered = 0.0
                evidence = len(self._outages)
                if len(kept) == len(configured) or index == len(starts) - 1:
                    # The configured cycle's last attempt is worth making: end there, as
                    # the configured cycle does, and let the monitor's next pass follow.
                    break
        last = len(starts) - 1
        if not kept or kept[-1] < last:
            # Never give up before the configured cycle would.
            if len(kept) == len(configured):
                kept[-1] = last
            else:
                kept.append(last)
        if kept == list(range(len(starts))):
            return None

        def failures(attempts: list[int]) -> float:
            # Expected failed attempts: before each segment's outages are found, every
            # attempt made; once this cycle's are spent, the later points (cycles) follow.
            total = 0.0
            for index in range(len(points)):
                made = sum(1 for k in attempts if k < index)
                if index > attempts[-1]:
                    made = len(attempts) + sum(
                        1 for j in range(attempts[-1] + 1, index) if j > last
                    )
                total += mass[first + index] * made
            return total + mass[-1] * (len(attempts) + len(later))

        configured_failures = failures(list(range(len(starts))))
        if failures(kept) > (1 - MIN_SAVING) * configured_failures:
            return None  # too little to gain for the delay a skipped attempt may cost
        waits = _waits(
            [points[i] for i in kept], points, elapsed, cap, attempt_duration, len(configured)
        )
        if (
            waits is not None
            and len(waits) == len(configured)
            and all(abs(a - min(b, cap)) < 1e-6 for a, b in zip(waits, configured))
        ):
            return None  # the cap put every skipped attempt back
        return waits


def _waits(
    targets: Sequence[float],
    points: Sequence[float],
    elapsed: float,
    cap: float,
    attempt_duration: float,
    count: int,
) -> tuple[float, ...] | None:
    """The waits reaching ``targets`` from ``elapsed``, none over ``cap``.

    Where skipped moments leave a gap longer than ``cap``, the furthest known moment within
    reach is attempted too; None when that needs more than ``count`` attempts.
    """
    chosen: list[float] = []
    waits: list[float] = []
    at = elapsed

    def wait_for(target: float) -> float:
        return max(target - at - (attempt_duration if waits else 0.0), 0.0)

    for target in targets:
        while wait_for(target) > cap + 1e-9:
            reach = [p for p in points if at < p and wait_for(p) <= cap + 1e-9]
            if not reach:
                return None
            waits.append(wait_for(reach[-1]))
            at = reach[-1]
            chosen.append(at)
        waits.append(wait_for(target))
        at = target
        chosen.append(at)
    if len(waits) > count:
        return None
    return tuple(waits)


def _moments(values: Iterable[float]) -> list[float]:
    """Distinct moments, ascending; ones within 3 % (at least 50 ms) of the last are one."""
    moments: list[float] = []
    for value in sorted(values):
        if moments and value - moments[-1] <= max(0.03 * moments[-1], 0.05):
            continue
        moments.append(value)
    return moments


def _informed(outages: Sequence[Outage], edges: Sequence[float]) -> list[int]:
    """Per segment, how many outages say whether they ended in it: those whose interval
    lies inside it or misses it, not those spanning it and others."""
    counts = [0] * (len(edges) - 1)
    for o in outages:
        low = _nearest(edges, o.not_before)
        high = max(_nearest(edges, o.until), low + 1)
        for k in range(len(counts)):
            if not low <= k < high or high - low == 1:
                counts[k] += 1
    return counts
