"""The return-time estimate of interval-censored outages.

An outage is only known as an interval: the component came back after its last failed
attempt (``not_before``) and by the attempt or check that found it healthy (``back_by``),
both counted from its first unhealthy check.  ``turnbull`` estimates how the return times
spread with Turnbull's self-consistency algorithm for interval-censored data, so a quick
success, which says only "back by then", is neither taken as the return time nor ignored.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Outage", "turnbull", "weighted_quantile"]

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


def turnbull(
    outages: Sequence[Outage], edges: Sequence[float], *, iterations: int | None = None
) -> list[float]:
    """The NPMLE of the return-time distribution over the segments ``(edges[k], edges[k+1]]``.

    ``edges`` ascend from 0; an outage's endpoints count at their nearest edge.  Each outage
    shares its unit of mass among the segments its interval overlaps in proportion to their
    current probabilities, until those stop changing (Turnbull's self-consistency algorithm,
    1976).  The mass starts in proportion to each segment's length, so segments no outage
    tells apart keep an even density.  ``iterations`` stops it early: a smoothed estimate
    between each outage spread evenly over its own interval (one step) and the NPMLE.
    """
    if not outages:
        raise ValueError("no outages to estimate from")
    segments = len(edges) - 1
    if segments < 1:
        raise ValueError("edges must hold at least two values")
    # Each endpoint snaps to its nearest edge: attempts start a little after the schedule's
    # nominal times (the previous attempt's own duration), and that drift must not count
    # as evidence for the next segment.  Outages with the same span are counted once.
    counts: dict[tuple[int, int], int] = {}
    for o in outages:
        low = _nearest(edges, o.not_before)
        high = min(max(_nearest(edges, o.until), low + 1), segments)
        low = min(low, high - 1)
        counts[(low, high)] = counts.get((low, high), 0) + 1
    spans = [(range(low, high), n / len(outages)) for (low, high), n in counts.items()]
    length = edges[-1] - edges[0]
    if length > 0:
        mass = [(edges[k + 1] - edges[k]) / length for k in range(segments)]
    else:
        mass = [1.0 / segments] * segments
    for _ in range(_EM_ITERATIONS if iterations is None else iterations):
        updated = [0.0] * segments
        for span, share in spans:
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
