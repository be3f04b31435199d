"""Choosing a cycle's schedule from a snapshot of the history, and checking the choice on
outages it had not seen.

``SchedulePlan.waits()`` takes the schedule ``_Model.best`` finds under two bounds from the
configured schedule on the same estimate (the expected delay from the return to the attempt
that finds it, and the share found later than the configured schedule's median delay, are
no larger), so on a bimodal history one attempt goes just after each mode.  It never makes
more attempts than configured, never waits longer than the cap before one, never ends
before the configured cycle would (after it, the monitor's next pass and the configured
cycles are what the estimate expects), and is used only when it is expected to save at
least ``MIN_SAVING`` (and ``MIN_SAVED``) of the failed attempts and the choice holds out of
sample: the outages are dealt into ``FOLDS`` folds, each fold's outages meet the schedule
chosen from the others (spread over their intervals by the estimate from all of them), and
together these must fail at least ``HELD_OUT_SAVING`` less than the configured schedule,
delay at most ``HELD_OUT_DELAY`` more and find at most ``HELD_OUT_LATE`` more of them later
than its median delay.  On random outages a chance cluster makes one fold's choice, which
the other fold's outages then refute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dwcp._estimate import Outage
from dwcp._schedule_model import _Model

__all__ = [
    "FOLDS",
    "HELD_OUT_DELAY",
    "HELD_OUT_LATE",
    "HELD_OUT_SAVING",
    "MIN_SAMPLES",
    "MIN_SAVED",
    "MIN_SAVING",
    "SchedulePlan",
]

#: Outages needed before a learned schedule may be used.
MIN_SAMPLES = 5
#: A learned schedule is used only when it is expected to save at least this share of the
#: failed attempts.
MIN_SAVING = 0.3
#: ... and at least this many failed attempts per outage.
MIN_SAVED = 0.1
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
# Configured cycles ``SchedulePlan.configured_probes`` lays out at most.
_MAX_CYCLES = 1000


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
