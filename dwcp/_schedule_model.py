"""What any attempt schedule is expected to cost on a learned estimate, and the search for
the best one.

The estimate (``dwcp._estimate.turnbull``) is stopped after ``SMOOTHING_STEPS`` steps from
an even start: the full NPMLE piles the mass of overlapping intervals into their
intersections, and the learned schedule's own attempts make such overlaps.  A rule-of-three
share (1/n with n outages) is added to every stretch between configured attempts, so a
stretch no outage has ended in yet is not taken as certain to stay empty.  Attempts are
placed at candidate moments (``_candidates``: the configured attempts, every moment past
outages were probed at, and an even grid) to fail least, a second of expected delay weighing
``DELAY_WEIGHT`` of an attempt (``_Model.best``, a dynamic program over (attempts made, last
candidate) keeping at most ``LABELS`` partial schedules per state, so its work is bounded by
``attempts * candidates**2 * LABELS``).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence

from dwcp._estimate import Outage, _nearest, turnbull

__all__ = ["DELAY_WEIGHT", "GRID", "LABELS", "MERGE", "SMOOTHING_STEPS"]

#: Self-consistency steps of the estimate a schedule is chosen by.  The full NPMLE piles the
#: mass of overlapping intervals into their intersections, and a learned schedule's own
#: attempts make such overlaps, so on random outages it would find a pattern that is not
#: there; a few steps from an even start keep it smooth.
SMOOTHING_STEPS = 2
#: Failed attempts per outage a learned schedule trades for one second of expected delay
#: (within the configured schedule's delay): without it, every second of that budget would
#: be spent to save the smallest share of an attempt.
DELAY_WEIGHT = 0.05
#: Steps of the even grid of candidate attempt moments over the learned range.
GRID = 24
#: Candidate moments closer than this share of their value are taken as one.
MERGE = 0.04
_MIN_STEP = 0.25
# The rule-of-three constant: with n informative outages and none in a stretch, its share
# may still be up to about this over n.
_CONFIDENCE = 1.0
#: Partial schedules kept per (attempts made, last point) by the schedule search.
LABELS = 6


# A partial schedule: expected failures, delay and late share so far, and its points.
_Label = tuple[float, float, float, tuple[int, ...]]


def _front(labels: list[_Label]) -> list[_Label]:
    """At most ``LABELS`` of ``labels`` that no other one beats on failures, delay and late
    share at once: the best scoring, and the least delaying and the least late."""
    labels.sort(key=lambda x: (x[0] + DELAY_WEIGHT * x[1], x[1], x[2]))
    kept: list[_Label] = []
    for label in labels:
        if not any(
            o[0] <= label[0] + 1e-12 and o[1] <= label[1] + 1e-12 and o[2] <= label[2] + 1e-12
            for o in kept
        ):
            kept.append(label)
    if len(kept) <= LABELS:
        return kept
    least_delay = min(kept, key=lambda x: (x[1], x[2]))
    least_late = min(kept, key=lambda x: (x[2], x[1]))
    chosen = kept[: LABELS - 2]
    for extra in (least_delay, least_late):
        if extra not in chosen:
            chosen.append(extra)
    return chosen


class _Model:
    """The learned return-time distribution over candidate attempt moments, and what any
    schedule over them is expected to cost.

    ``points`` are the candidate moments after ``start`` (the cycle's beginning), ascending;
    segment ``k`` is ``(points[k-1], points[k]]`` (``start`` for ``k == 0``), within which the
    return time is taken as evenly spread.  ``mass`` is the estimate's share of each segment
    (given the outage lasted past ``start``); ``hedged`` adds a rule-of-three share spread
    evenly, and prices the failed attempts, so a stretch no outage ended in is not taken as
    certain to stay empty.  After a schedule's last attempt, the moments later cycles
    reached in past outages (``later``) are what find an outage still down; past them all,
    the last point does.
    """

    def __init__(
        self,
        points: list[float],
        mass: list[float],
        hedged: list[float],
        start: float,
        *,
        cycle: Sequence[float],
        pause: float,
        duration: float,
    ) -> None:
        self.points = points
        self.origin = start
        self._lows = [start, *points[:-1]]
        n = len(points)
        #: survival[k]: the hedged chance of being still down at points[k] (a failed attempt).
        self.survival = [0.0] * n
        remaining = 1.0
        for k in range(n):
            remaining -= hedged[k]
            self.survival[k] = max(remaining, 0.0)
        # Prefix sums of the hedged mass and of it times each segment's midpoint: the delay
        # is priced with the hedge too, so skipping a stretch no outage ended in costs.
        mass = hedged
        self._mass = mass
        self._m = [0.0]
        self._w = [0.0]
        for k in range(n):
            self._m.append(self._m[-1] + mass[k])
            self._w.append(self._w[-1] + mass[k] * (self._lows[k] + points[k]) / 2)
        self._hedged_m = [0.0]
        for k in range(n):
            self._hedged_m.append(self._hedged_m[-1] + hedged[k])
        self._cycle = cycle
        self._pause = pause
        self._duration = duration
        self._tails: dict[int, tuple[float, float, float]] = {}
        #: The delay a schedule's median is held to (see ``late``); set before ``best``.
        self.median = 0.0
        #: Partial schedules extended by ``best`` (its cost).
        self.evaluations = 0

    @classmethod
    def build(
        cls,
        outages: Sequence[Outage],
        configured: Sequence[float],
        starts: Sequence[float],
        elapsed: float,
        *,
        pause: float,
        duration: float,
    ) -> _Model | None:
        longest = max(o.until for o in outages)
        horizon = max(longest, starts[-1]) + 1.0
        points = _candidates(outages, starts, elapsed, horizon)
        edges = [0.0, elapsed, *points] if elapsed > 0 else [0.0, *points]
        mass = turnbull(outages, edges, iterations=SMOOTHING_STEPS)
        if elapsed > 0:
            mass = mass[1:]
        total = sum(mass)
        if total <= 1e-9:
            return None
        # A rule-of-three share per stretch between configured attempts (and past the
        # last): with n outages and none ending in a stretch, the next ones may still end
        # there about 1/n of the time.  Spread evenly within each stretch.
        bounds = [elapsed, *(t for t in starts if t > elapsed), points[-1]]
        regions = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
        share = min(_CONFIDENCE / len(outages), 0.5 / len(regions))
        lows = [elapsed, *points[:-1]]
        mass = [m / total for m in mass]
        hedged = []
        for m, lo, hi in zip(mass, lows, points):
            spread = sum(share * max(min(hi, b) - max(lo, a), 0.0) / (b - a) for a, b in regions)
            hedged.append((1 - share * len(regions)) * m + spread)
        return cls(points, mass, hedged, elapsed, cycle=configured, pause=pause, duration=duration)

    def _at(self, prefix: Sequence[float], moment: float) -> float:
        """``prefix`` (cumulative per point) read at any ``moment``, evenly within segments."""
        points = self.points
        if moment >= points[-1]:
            return prefix[-1]
        if moment <= self.origin:
            return 0.0
        k = bisect.bisect_left(points, moment)
        lo, hi = self._lows[k], points[k]
        part = (moment - lo) / (hi - lo) if hi > lo else 1.0
        return prefix[k] + part * (prefix[k + 1] - prefix[k])

    def _between(self, low: float, high: float) -> tuple[float, float, float]:
        """Failed-attempt chance at ``high``, expected delay and late share of the outages
        ending in ``(low, high]`` found at ``high``, for moments off the points."""
        survival = 1.0 - self._at(self._hedged_m, high)
        m = self._at(self._m, high) - self._at(self._m, low)
        # The mean of a segment's part is its midpoint, the mass being even within it.
        mean = (low + high) / 2 if m <= 0 else self._mean(low, high, m)
        cut = min(max(high - self.median, low), high)
        late = self._at(self._m, cut) - self._at(self._m, low)
        return max(survival, 0.0), m * (high - mean), late

    def cumulative(self, moment: float) -> tuple[float, float]:
        """The estimate's share of returns by ``moment``, and their sum of return times
        (weighted by share), the mass taken as even within each segment."""
        points = self.points
        if moment <= self.origin:
            return 0.0, 0.0
        if moment >= points[-1]:
            return self._m[-1], self._w[-1]
        k = bisect.bisect_left(points, moment)
        lo, hi = self._lows[k], points[k]
        if hi <= lo:
            return self._m[k + 1], self._w[k + 1]
        density = self._mass[k] / (hi - lo)
        return (
            self._m[k] + density * (moment - lo),
            self._w[k] + density * (moment * moment - lo * lo) / 2,
        )

    def _mean(self, low: float, high: float, m: float) -> float:
        # Sum over the segments overlapping (low, high] of their part's mass and midpoint.
        total = 0.0
        cuts = [low, *(p for p in self.points if low < p < high), high]
        for a, b in itertools.pairwise(cuts):
            total += (self._at(self._m, b) - self._at(self._m, a)) * (a + b) / 2
        return total / m

    def index(self, moment: float) -> int:
        """The point nearest ``moment``."""
        return min(_nearest(self.points, moment), len(self.points) - 1)

    def delay(self, low: int, high: int) -> float:
        """Expected delay of the outages ending after point ``low`` (-1: the start) and by
        point ``high``, found at ``high``, weighted by their share."""
        m = self._m[high + 1] - self._m[low + 1]
        w = self._w[high + 1] - self._w[low + 1]
        return self.points[high] * m - w

    def late(self, low: int, high: int) -> float:
        """The share of the outages ending after point ``low`` and by point ``high`` that
        are found at ``high`` more than ``median`` seconds after they ended."""
        cut = self.points[high] - self.median  # those ending before this are found late
        first = low + 1
        if cut <= self._lows[first]:
            return 0.0
        # Whole segments before the cut, and the part of the one it falls in.
        k = min(max(bisect.bisect_left(self.points, cut, first, high + 1), first), high)
        share = self._m[k] - self._m[first]
        lo, hi = self._lows[k], self.points[k]
        if hi > lo:
            share += self._mass[k] * min(max((cut - lo) / (hi - lo), 0.0), 1.0)
        return share

    def tail(self, last: int) -> tuple[float, float, float]:
        """Failed attempts, delay and late share after a schedule's last attempt at ``last``:
        the monitor's next check ``pause`` after it, then configured cycles, each followed
        by such a check, until the estimate's range is passed."""
        cached = self._tails.get(last)
        if cached is not None:
            return cached
        failed = delay = late = 0.0
        at = self.points[last]
        end = self.points[-1]
        while at < end:
            check = at + self._duration + self._pause
            _, d, lt = self._between(at, check)
            delay, late, at = delay + d, late + lt, check
            for index, wait in enumerate(self._cycle):
                if at >= end:
                    break
                moment = at + wait + (self._duration if index else 0.0)
                f, d, lt = self._between(at, moment)
                failed, delay, late, at = failed + f, delay + d, late + lt, moment
        self._tails[last] = (failed, delay, late)
        return failed, delay, late

    def cost(self, attempts: Sequence[int]) -> tuple[float, float, float]:
        """Expected failed attempts, delay and late share of attempts at these points."""
        failed, delay, late = self.tail(attempts[-1])
        previous = -1
        for k in attempts:
            failed += self.survival[k]
            delay += self.delay(previous, k)
            late += self.late(previous, k)
            previous = k
        return failed, delay, late

    def median_delay(self, attempts: Sequence[int]) -> float:
        """The median delay of attempts at these points, by bisection on ``late``."""
        low, high = 0.0, self.points[-1] - self.origin
        for _ in range(40):
            self.median = (low + high) / 2
            self._tails.clear()
            if self.cost(attempts)[2] > 0.5:
                low = self.median
            else:
                high = self.median
        self.median = high
        self._tails.clear()
        return high

    def best(
        self,
        count: int,
        end: float,
        cap: float,
        duration: float,
        *,
        max_delay: float,
        max_late: float,
        first: int | None = None,
    ) -> tuple[tuple[int, ...], float] | None:
        """The schedule of at most ``count`` attempts scoring least (expected failures plus
        ``DELAY_WEIGHT`` per second of expected delay) that ends at or after
        ``end``, waits at most ``cap`` before each attempt, is expected to delay no more
        than ``max_delay`` and to find at most ``max_late`` of the outages later than
        ``median``: its points and expected failures, or None.  With ``first``, the first
        attempt is at that point.

        A dynamic program over (attempts made, last point): each state keeps at most
        ``LABELS`` partial schedules that no other one beats on failures, delay and late
        share at once (the best scoring, and the least delaying and least late, so a
        feasible one is never lost for a better scoring one).  So the cost is at most
        ``count * len(points)**2 * LABELS`` extensions (``evaluations`` counts them),
        polynomial in ``count`` where a search of every schedule grows exponentially.  The
        result may score a little worse than the best of all schedules; its bounds are
        checked exactly.
        """
        points = self.points
        survival = self.survival
        pairs: dict[tuple[int, int], tuple[float, float]] = {}

        def pair(low: int, high: int) -> tuple[float, float]:
            value = pairs.get((low, high))
            if value is None:
                value = pairs[(low, high)] = (self.delay(low, high), self.late(low, high))
            return value

        best: tuple[tuple[int, ...], float, float] | None = None
        # The partial schedules with as many attempts as the layer's number, by last point:
        # (failed, delay, late, points).
        layer: dict[int, list[_Label]] = {}
        if first is None:
            start: list[tuple[int, _Label]] = [(-1, (0.0, 0.0, 0.0, ()))]
            layer = self._extend(start, cap, duration, pair, max_delay, max_late, None)
        elif points[first] - self.origin <= cap + 1e-9:
            step, more_late = pair(-1, first)
            if step <= max_delay and more_late <= max_late:
                layer = {first: [(survival[first], step, more_late, (first,))]}
        for made in range(1, count + 1):
            for last, labels in layer.items():
                if points[last] < end - 1e-6:
                    continue
                more = self.tail(last)
                for failed, delay, late, chosen in labels:
                    total = (failed + more[0], delay + more[1])
                    if total[1] <= max_delay and late + more[2] <= max_late:
                        score = total[0] + DELAY_WEIGHT * total[1]
                        if best is None or score < best[2] - 1e-12:
                            best = (chosen, total[0], score)
            if made == count or not layer:
                break
            layer = self._extend(
                [(last, label) for last, labels in layer.items() for label in labels],
                cap,
                duration,
                pair,
                max_delay,
                max_late,
                None if best is None else best[2],
            )
        return None if best is None else best[:2]

    def _extend(
        self,
        labels: Sequence[tuple[int, _Label]],
        cap: float,
        duration: float,
        pair: Callable[[int, int], tuple[float, float]],
        max_delay: float,
        max_late: float,
        bound: float | None,
    ) -> dict[int, list[_Label]]:
        """Every partial schedule in ``labels`` (by its last point, -1 for none) with one more
        attempt at each later point in reach, kept as ``best`` describes; ``bound`` is the
        best score found so far, which a partial schedule that reaches it cannot beat (the
        score only grows as attempts are added)."""
        points = self.points
        survival = self.survival
        n = len(points)
        grown: dict[int, list[_Label]] = {}
        for last, (failed, delay, late, chosen) in labels:
            low = self.origin if last < 0 else points[last] + duration
            for k in range(last + 1, n):
                if points[k] - low > cap + 1e-9:
                    break
                self.evaluations += 1
                step, more_late = pair(last, k)
                if delay + step > max_delay or late + more_late > max_late:
                    break  # both only grow with a later attempt
                more_failed = failed + survival[k]
                if bound is not None and more_failed + DELAY_WEIGHT * (delay + step) >= bound:
                    continue
                grown.setdefault(k, []).append(
                    (more_failed, delay + step, late + more_late, (*chosen, k))
                )
        for k, found in grown.items():
            grown[k] = _front(found)
        return grown


def _candidates(
    outages: Sequence[Outage], starts: Sequence[float], elapsed: float, horizon: float
) -> list[float]:
    """Moments after ``elapsed`` an attempt may be placed at, ascending, ending at ``horizon``.

    The configured attempts, every moment past outages were known to be down or back at
    (so the estimate's segments follow the evidence), and an even grid of ``GRID`` steps
    (at least ``_MIN_STEP`` apart) for the stretches no attempt has probed yet.  Moments
    within ``MERGE`` (at least 0.1 s) of one already kept are dropped; the configured ones stay.
    """
    step = max((horizon - elapsed) / GRID, _MIN_STEP)
    grid = [elapsed + step * k for k in range(1, int((horizon - elapsed) / step) + 1)]
    observed = [v for o in outages for v in (o.not_before, o.until)]
    kept = sorted(t for t in starts if t > elapsed)
    for value in sorted(v for v in (*observed, *grid, horizon) if v > elapsed + 1e-9):
        at = bisect.bisect_left(kept, value)
        near = [kept[i] for i in (at - 1, at) if 0 <= i < len(kept)]
        if any(abs(value - k) <= max(MERGE * k, 0.1) for k in near):
            continue
        kept.insert(at, value)
    if kept[-1] < horizon - 1e-9:
        kept.append(horizon)
    return kept
