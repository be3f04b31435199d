"""Recovery timing learned from past outages: when a component has usually come back.

An outage is only known as an interval: the component came back after its last failed
attempt (``not_before``) and by the attempt or check that found it healthy (``back_by``),
both counted from its first unhealthy check.  ``RecoveryHistory`` keeps the recent outages
and estimates how their return times spread, with Turnbull's self-consistency algorithm for
interval-censored data (so a quick success, which says only "back by then", is neither taken
as the return time nor ignored) stopped after ``SMOOTHING_STEPS`` steps from an even start:
the full NPMLE piles the mass of overlapping intervals into their intersections, and the
learned schedule's own attempts make such overlaps.  A rule-of-three share (1/n with n
outages) is added to every stretch between configured attempts, so a stretch no outage has
ended in yet is not taken as certain to stay empty.

A cycle's attempts are then placed at candidate moments (the configured attempts, every
moment past outages were probed at, and an even grid) to fail least, a second of expected
delay weighing ``DELAY_WEIGHT`` of an attempt, under two bounds: the expected delay from the
return to the attempt that finds it, and the share found later than the configured
schedule's median delay, are no larger than the configured schedule's.  So on a bimodal
history one attempt goes just after each mode.  The schedule never makes more attempts than
configured, never waits longer than the cap before one, never ends before the configured
cycle would (after it, the monitor's next pass and the configured cycles are what the
estimate expects), and is used only when it is expected to save at least ``MIN_SAVING`` (and
``MIN_SAVED``) of the failed attempts and the choice holds out of sample: the outages are
dealt into ``FOLDS`` folds, each fold's outages meet the schedule chosen from the others
(spread over their intervals by the estimate from all of them), and together these must fail
at least ``HELD_OUT_SAVING`` less than the configured schedule, delay at most
``HELD_OUT_DELAY`` more and find at most ``HELD_OUT_LATE`` more of them later than its median
delay.  On random outages a chance cluster makes one fold's choice, which the other fold's
outages then refute.  A run of outages beyond the learned range on one
side is taken as a change of pattern: the older history is dropped and the configured
schedule is used until enough new outages are known.  Every ``EXPLORE_EVERY``-th outage's
cycle makes the configured first attempt, since only an earlier attempt can show that the
component now comes back sooner.  ``RecoveryHistory`` is not thread-safe: the manager
calls it under its lock, when a cycle begins (``plan``: a snapshot of the outages, no
search) and when an outage ends (``record``).  The search, ``SchedulePlan.waits()``, runs on
the recovery thread, off the lock, from that snapshot; a dynamic program over (attempts
made, last candidate) keeping at most ``LABELS`` partial schedules per state bounds it by
``attempts * candidates**2 * LABELS`` steps, where a search of every schedule grew
exponentially with ``attempts``.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "CHANGE_RUN",
    "EXPLORE_EVERY",
    "MIN_SAMPLES",
    "Outage",
    "RecoveryHistory",
    "SchedulePlan",
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
#: A learned schedule is used only when it is expected to save at least this share of the
#: failed attempts.
MIN_SAVING = 0.3
#: ... and at least this many failed attempts per outage.
MIN_SAVED = 0.1
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
#: Folds of the history a learned schedule is checked on (see ``_Plan.validated``).
FOLDS = 2
#: The share of the failed attempts the choice must save on outages it had not seen.
HELD_OUT_SAVING = 0.1
#: ... while delaying them at most this share more than the configured schedule.
HELD_OUT_DELAY = 0.05
#: ... and finding at most this share more of them later than its median delay.
HELD_OUT_LATE = 0.02
# Attempts begin this much after their nominal moments at most (see ``_Plan._held_out``).
_SNAP = 0.05
# Outages a fold's choice may be made from: the held-out check, not this, guards it.
_FOLD_SAMPLES = 2
# The rule-of-three constant: with n informative outages and none in a stretch, its share
# may still be up to about this over n.
_CONFIDENCE = 1.0
#: Partial schedules kept per (attempts made, last point) by the schedule search.
LABELS = 6
_EM_ITERATIONS = 100
# Configured cycles ``SchedulePlan.configured_probes`` lays out at most.
_MAX_CYCLES = 1000
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


@dataclass(frozen=True)
class SchedulePlan:
    """A snapshot of a history and the cycle a schedule is wanted for (see
    ``RecoveryHistory.plan``); ``waits()`` searches it, off any lock."""

    outages: tuple[Outage, ...]
    configured: tuple[float, ...]
    elapsed: float
    cap: float
    attempt_duration: float
    pause: float
    exploring: bool
    _searched: bool = field(default=False, init=False, compare=False, repr=False)
    _result: tuple[float, ...] | None = field(default=None, init=False, compare=False, repr=False)

    def configured_probes(self, end: float) -> list[float]:
        """The moments the configured schedule would find the component back at, from this
        cycle on, until ``end``: its attempts, then after each cycle the monitor's check
        ``pause`` later and the next configured cycle (as ``_Plan._held_out`` meets
        outages)."""
        cap, duration = self.cap, self.attempt_duration
        probes: list[float] = []
        at = self.elapsed
        # Bounded: a cycle of zero waits and durations would never pass ``end``.
        for _ in range(_MAX_CYCLES):
            for index, wait in enumerate(self.configured):
                at += min(wait, cap) + (duration if index else 0.0)
                probes.append(at)
            at += duration + self.pause
            probes.append(at)  # the monitor's check
            if at >= end:
                break
        return probes

    def waits(self) -> tuple[float, ...] | None:
        """Waits for the cycle, or None: run the configured schedule (remembered: the
        search runs once per plan, and ``result`` tells which ran).

        Of the schedules of at most ``len(configured)`` attempts over the candidate moments
        (see ``_candidates``) that end no sooner than the configured cycle and wait at most
        ``cap`` before each attempt, the one expected to fail least without a longer
        expected delay than the configured schedule's is chosen (see ``_Model.best``).
        None means: nothing worth at least ``MIN_SAVING`` of the failed attempts, or a
        choice that did not hold on outages it had not seen (see ``_Plan.validated``).
        """
        if not self._searched:
            object.__setattr__(self, "_result", self._search())
            object.__setattr__(self, "_searched", True)
        return self._result

    @property
    def result(self) -> tuple[float, ...] | None:
        """What ``waits()`` returned, None before it ran."""
        return self._result

    def _search(self) -> tuple[float, ...] | None:
        elapsed, cap, duration = self.elapsed, self.cap, self.attempt_duration
        starts: list[float] = []
        at = elapsed
        for index, wait in enumerate(self.configured):
            at += min(wait, cap) + (duration if index else 0.0)
            starts.append(at)
        plan = _Plan(
            [min(w, cap) for w in self.configured],
            starts,
            elapsed,
            cap,
            duration,
            self.pause,
            self.exploring,
        )
        chosen = plan.choose(self.outages)
        if chosen is None:
            return None
        if len(chosen) == len(starts) and all(abs(a - b) < 1e-6 for a, b in zip(chosen, starts)):
            return None
        if not plan.validated(self.outages):
            return None  # the saving did not hold on outages the choice had not seen
        waits: list[float] = []
        at = elapsed
        for target in chosen:
            waits.append(max(target - at - (duration if waits else 0.0), 0.0))
            at = target
        return tuple(waits)


class _Plan:
    """One schedule decision: the configured cycle, where it starts, its bounds; the learned
    choice for any set of outages, and the check of that choice on outages it had not seen."""

    def __init__(
        self,
        cycle: Sequence[float],
        starts: Sequence[float],
        elapsed: float,
        cap: float,
        duration: float,
        pause: float,
        exploring: bool,
    ) -> None:
        self.cycle = list(cycle)
        self.starts = list(starts)
        self.elapsed = elapsed
        self.cap = cap
        self.duration = duration
        self.pause = pause
        self.exploring = exploring
        #: The estimate from every outage, which ``validated`` spreads each outage by.
        self.reference: _Model | None = None

    def choose(self, outages: Sequence[Outage], minimum: int = MIN_SAMPLES) -> list[float] | None:
        """The attempt moments learned from at least ``minimum`` ``outages``, or None for the
        configured ones."""
        if len(outages) < minimum:
            return None
        model = _Model.build(
            outages,
            self.cycle,
            self.starts,
            self.elapsed,
            pause=self.pause,
            duration=self.duration,
        )
        if model is None:
            return None  # every known outage had ended by now: nothing to go on
        if self.reference is None:
            self.reference = model
        configured_points = [model.index(t) for t in self.starts]
        # The configured schedule's median delay, and what it costs with that median.
        model.median_delay(configured_points)
        failed, delay, late = model.cost(configured_points)
        if failed <= 1e-9:
            return None  # the configured schedule is not expected to fail: nothing to save
        # The tolerances absorb the estimate's own convergence error (about 1e-5 of mass).
        best = model.best(
            len(self.cycle),
            self.starts[-1],
            self.cap,
            self.duration,
            max_delay=delay * 1.001 + 1e-3,
            max_late=late + 1e-3,
            first=configured_points[0] if self.exploring else None,
        )
        # An exploring cycle keeps the configured first attempt, whatever the rest saves.
        saving = 0.0 if self.exploring else MIN_SAVING
        if best is None or best[1] > min((1 - saving) * failed, failed - MIN_SAVED):
            return None  # too little to gain
        return [model.points[i] for i in best[0]]

    def validated(self, outages: Sequence[Outage]) -> bool:
        """Whether choosing on part of ``outages`` beats the configured schedule on the rest.

        The outages are dealt into ``FOLDS`` folds by a fixed scramble of their places
        (not in turn, so outages that alternate do not fall into one fold each); each fold's outages are met with the
        choice made on the others (the configured schedule when that chooses none), as far
        as their intervals tell.  Over all folds, the choice must fail at most
        ``1 - HELD_OUT_SAVING`` as often (an exploring cycle too) and delay at most
        ``HELD_OUT_DELAY`` more than the configured schedule.
        """
        kept = list(outages)
        folds = [_fold(i) for i in range(len(kept))]
        learned: list[tuple[float, float, float, float, float]] = []
        configured: list[tuple[float, float, float, float, float]] = []
        for fold in range(FOLDS):
            test = [o for o, f in zip(kept, folds) if f == fold]
            train = [o for o, f in zip(kept, folds) if f != fold]
            moments = self.choose(train, _FOLD_SAMPLES) or self.starts
            learned += self._held_out(moments, test)
            configured += self._held_out(self.starts, test)
        failed = sum(p * f for p, f, _, _, _ in configured)
        if failed <= 1e-9:
            return False
        if sum(p * f for p, f, _, _, _ in learned) > (1 - HELD_OUT_SAVING) * failed:
            return False
        delay = sum(p * d for p, _, d, _, _ in configured)
        if sum(p * d for p, _, d, _, _ in learned) > delay * (1 + HELD_OUT_DELAY) + 1e-9:
            return False
        # The configured median delay, by bisection on the share found later than it.
        total = sum(p for p, _, _, _, _ in configured)
        low, high = 0.0, max((w for _, _, _, _, w in configured), default=0.0)
        for _ in range(30):
            middle = (low + high) / 2
            if _late(configured, middle) > total / 2:
                low = middle
            else:
                high = middle
        return _late(learned, high) <= total * (0.5 + HELD_OUT_LATE) + 1e-9

    def _held_out(
        self, moments: Sequence[float], outages: Sequence[Outage]
    ) -> list[tuple[float, float, float, float, float]]:
        """How attempts at ``moments`` (then the monitor's check and configured cycles, as in
        ``_Model.tail``) meet the outages that lasted past the cycle's start, each spread
        over its interval as the estimate from every outage spreads it: pieces of outage
        (share, failed attempts before it was found, mean, shortest and longest delay)."""
        live = [o for o in outages if o.until > self.elapsed + 1e-9]
        pieces: list[tuple[float, float, float, float, float]] = []
        if not live:
            return pieces
        end = max(o.until for o in live) + 1.0
        probes = [(t, True) for t in moments]
        at = moments[-1]
        while at < end:
            at += self.duration + self.pause
            probes.append((at, False))  # a check: finds it back, never a failed attempt
            for index, wait in enumerate(self.cycle):
                if at >= end:
                    break
                at += wait + (self.duration if index else 0.0)
                probes.append((at, True))
        model = self.reference
        known: dict[float, tuple[float, float]] = {}

        def cumulative(moment: float) -> tuple[float, float]:
            value = known.get(moment)
            if value is None:
                assert model is not None
                value = known[moment] = model.cumulative(moment)
            return value

        for o in live:
            low, high = max(o.not_before, self.elapsed), o.until
            # Where in its interval the outage ended: as the estimate from every outage
            # spreads it (evenly, where that puts no mass).
            weight = 0.0 if model is None else cumulative(high)[0] - cumulative(low)[0]
            even = weight <= 1e-12
            span = (high - low) if even else weight
            before = 0  # attempts made before the probe looked at
            previous = low
            for t, attempt in probes:
                # A probe within _SNAP of an end is taken at it: attempts begin a little
                # after their nominal moments, and that drift is no evidence either way.
                last = t >= high - _SNAP
                if last:
                    t, cut = max(t, high), high
                elif t <= low + _SNAP:
                    before += attempt
                    continue
                else:
                    cut = t
                # Back in (previous, cut] with this share, found at t.
                if span <= 0:
                    part, mean = 1.0, high
                elif even:
                    part, mean = (cut - previous) / span, (previous + cut) / 2
                else:
                    (m0, w0), (m1, w1) = cumulative(previous), cumulative(cut)
                    part = (m1 - m0) / span
                    mean = (w1 - w0) / (m1 - m0) if m1 - m0 > 1e-12 else (previous + cut) / 2
                pieces.append((part, before, t - mean, t - cut, t - previous))
                if last:
                    break
                before += attempt
                previous = cut
        return pieces


def _fold(index: int) -> int:
    """The fold of the outage at ``index``: Fibonacci hashing, even and without a short
    period."""
    return (((index * 0x9E3779B1) & 0xFFFFFFFF) * FOLDS) >> 32


def _late(pieces: Sequence[tuple[float, float, float, float, float]], delay: float) -> float:
    """The share of ``pieces`` (see ``_Plan._held_out``) found more than ``delay`` after the
    return, each piece's delays taken as even up to its longest."""
    late = 0.0
    for part, _, _, shortest, longest in pieces:
        if longest <= delay:
            continue
        if longest - shortest <= 1e-12:
            late += part
        else:
            late += part * min((longest - delay) / (longest - shortest), 1.0)
    return late


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
