"""Suspicion levels: the phi accrual failure detector, per component.

``PhiAccrualFailureDetector`` is the detector of Hayashibara et al. (2004) exactly as Akka's
``akka.remote.PhiAccrualFailureDetector`` computes it: the inter-arrival times of the last
``max_sample_size`` heartbeats are summarised by their mean and standard deviation (running
sums, O(1) per heartbeat), and phi is ``-log10`` of the probability, under a normal
distribution approximated by Akka's logistic formula, that a heartbeat comes later than
now.  The mean is shifted by ``acceptable_heartbeat_pause`` and the deviation is at least
``min_std_deviation``; the history starts from two made-up intervals around
``first_heartbeat_estimate`` (plus and minus a quarter), and an interval is recorded only
while the detector still deems the source available.

``ComponentSuspicion`` combines, for one component, an arrival detector fed by each passing
health check (Akka's defaults scaled from its 1 s heartbeat to the health interval) with
latency detectors fed by check latencies and, for the transport, by its sends: the manager
feeds every failed send and the latency of about one successful send in 128 (a sample).  A
check still running, or one that failed, counts as a response not yet arrived, so its phi
rises with the time since it began; so does a failed send, until the next passing check or
sampled successful send shows the component answering again.

The latency detectors' settings are ours, not Akka's: a response expected within a tenth
of the check timeout until measured, a minimum deviation of a tenth of that (a hundredth of
the timeout), and no acceptable pause.  They start from Akka's two made-up intervals around
that estimate, and once ``WARMUP`` latencies are measured they keep only measured ones
(every answered latency, so a link that has become slower for good stops being suspected
once that is its norm).  A latency channel reads the phi of the last latency, judged
against the history before it, less that of a latency at the history's mean (``log10(2)``), and 0 below it: so a component answering as
it usually does reads 0.  With a steady history, a check or send whose latency is about six
minimum deviations (six hundredths of the check timeout) over the usual one reaches the
default threshold of 8, from the ``WARMUP + 1``-th check on; a noisier history needs a
larger rise.  The component's suspicion is the largest of these phis, read as 0 under
``NEGLIGIBLE`` (a thousandth).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from dwcp import _validation as check

__all__ = ["NEGLIGIBLE", "WARMUP", "ComponentSuspicion", "PhiAccrualFailureDetector", "phi"]

_LN10 = math.log(10.0)

# Akka's cluster failure-detector defaults, for a heartbeat every second.
AKKA_THRESHOLD = 8.0
AKKA_MAX_SAMPLE_SIZE = 1000
AKKA_MIN_STD_DEVIATION = 0.1  # 100 ms
AKKA_ACCEPTABLE_HEARTBEAT_PAUSE = 3.0  # 3 s
AKKA_HEARTBEAT_INTERVAL = 1.0  # 1 s, also Akka's first-heartbeat estimate

#: Latencies measured before a latency detector drops its two made-up intervals.
WARMUP = 5
#: A suspicion under this reads 0 (the formulas' tails and rounding, not evidence).
NEGLIGIBLE = 1e-3
# "As usual" reaches two deviations past the expected value (a latency, or an arrival
# after the mean interval and the acceptable pause): the phi up to there is scheduling and
# network noise, not suspicion. Only the phi above it counts. (Set after ``phi`` below.)
_PHI_USUAL = 0.0


def phi(time_diff: float, mean: float, std_deviation: float) -> float:
    """Akka's phi for ``time_diff`` seconds since the last heartbeat.

    Akka computes ``y = (time_diff - mean) / std_deviation``,
    ``e = exp(-y * (1.5976 + 0.070566 * y * y))`` and ``-log10(e / (1 + e))`` (the logistic
    approximation of the normal tail); that equals ``log10(1 + exp(b))`` with
    ``b = y * (1.5976 + 0.070566 * y * y)``, evaluated here without overflow.
    """
    y = (time_diff - mean) / std_deviation
    b = y * (1.5976 + 0.070566 * y * y)
    if b > 30.0:
        return (b + math.log1p(math.exp(-b))) / _LN10
    return math.log1p(math.exp(b)) / _LN10


_PHI_USUAL = phi(2.0, 0.0, 1.0)


class _History:
    """The last ``size`` intervals with their running sum and sum of squares."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._intervals: deque[float] = deque()
        self._sum = 0.0
        self._squares = 0.0
        self._evictions = 0

    def __len__(self) -> int:
        return len(self._intervals)

    def add(self, interval: float) -> None:
        if len(self._intervals) >= self._size:
            dropped = self._intervals.popleft()
            self._sum -= dropped
            self._squares -= dropped * dropped
            self._evictions += 1
            if self._evictions >= self._size:
                # Subtracting floats drifts; one exact re-sum per window keeps it bounded
                # and costs O(1) per sample amortised.
                self._sum = math.fsum(self._intervals)
                self._squares = math.fsum(x * x for x in self._intervals)
                self._evictions = 0
        self._intervals.append(interval)
        self._sum += interval
        self._squares += interval * interval

    @property
    def mean(self) -> float:
        return self._sum / len(self._intervals)

    @property
    def std_deviation(self) -> float:
        mean = self.mean
        return math.sqrt(max(self._squares / len(self._intervals) - mean * mean, 0.0))


class PhiAccrualFailureDetector:
    """Akka's phi accrual failure detector; times are seconds, thread-safe.

    ``threshold`` is the phi above which the source is deemed unavailable,
    ``max_sample_size`` the intervals kept, ``min_std_deviation`` the smallest deviation
    used, ``acceptable_heartbeat_pause`` a pause tolerated on top of the mean, and
    ``first_heartbeat_estimate`` the interval assumed before any was measured.  ``clock``
    gives the time when a call passes none.
    """

    def __init__(
        self,
        *,
        threshold: float = AKKA_THRESHOLD,
        max_sample_size: int = AKKA_MAX_SAMPLE_SIZE,
        min_std_deviation: float = AKKA_MIN_STD_DEVIATION,
        acceptable_heartbeat_pause: float = AKKA_ACCEPTABLE_HEARTBEAT_PAUSE,
        first_heartbeat_estimate: float = AKKA_HEARTBEAT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = check.number("threshold", threshold, allow_zero=False)
        if isinstance(max_sample_size, bool) or not isinstance(max_sample_size, int):
            raise TypeError(f"max_sample_size must be an int, got {type(max_sample_size).__name__}")
        if max_sample_size < 1:
            raise ValueError(f"max_sample_size must be at least 1, got {max_sample_size}")
        self.max_sample_size = max_sample_size
        self.min_std_deviation = check.seconds("min_std_deviation", min_std_deviation)
        self.acceptable_heartbeat_pause = check.seconds(
            "acceptable_heartbeat_pause", acceptable_heartbeat_pause, allow_zero=True
        )
        self.first_heartbeat_estimate = check.seconds(
            "first_heartbeat_estimate", first_heartbeat_estimate
        )
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__}")
        self._clock = clock
        self._lock = threading.Lock()
        self._history = self._first_history()
        self._last: float | None = None

    def _first_history(self) -> _History:
        # Akka bootstraps with two intervals of rather high deviation around the estimate.
        history = _History(self.max_sample_size)
        mean = self.first_heartbeat_estimate
        deviation = mean / 4
        history.add(mean - deviation)
        history.add(mean + deviation)
        return history

    def heartbeat(self, now: float | None = None) -> None:
        """Record a heartbeat arriving at ``now``."""
        at = self._clock() if now is None else now
        with self._lock:
            # The first heartbeat after a long pause would skew the statistics.
            if self._last is not None and self._phi_locked(at) < self.threshold:
                self._history.add(max(at - self._last, 0.0))
            self._last = at

    def reset_history(self, intervals: list[float]) -> None:
        """Replace the history (the made-up intervals included) with ``intervals``."""
        if not intervals:
            raise ValueError("intervals must not be empty")
        history = _History(self.max_sample_size)
        for interval in intervals[-self.max_sample_size :]:
            history.add(max(float(interval), 0.0))
        with self._lock:
            self._history = history

    def add_interval(self, interval: float) -> None:
        """Record one interval directly (a measured latency, say), bypassing arrivals."""
        with self._lock:
            self._history.add(max(float(interval), 0.0))

    def phi(self, now: float | None = None) -> float:
        """The suspicion level at ``now``; 0 before the first heartbeat."""
        at = self._clock() if now is None else now
        with self._lock:
            if self._last is None:
                return 0.0
            return self._phi_locked(at)

    def phi_after(self, elapsed: float) -> float:
        """The phi of ``elapsed`` seconds without a heartbeat, whatever the last one was."""
        with self._lock:
            return self._phi_of(elapsed)

    @property
    def mean(self) -> float:
        """The mean interval of the history."""
        with self._lock:
            return self._history.mean

    @property
    def std_deviation(self) -> float:
        """The standard deviation of the history (before ``min_std_deviation`` applies)."""
        with self._lock:
            return self._history.std_deviation

    def _phi_locked(self, at: float) -> float:
        assert self._last is not None
        return self._phi_of(at - self._last)

    def _phi_of(self, elapsed: float) -> float:
        history = self._history
        deviation = max(history.std_deviation, self.min_std_deviation)
        return phi(elapsed, history.mean + self.acceptable_heartbeat_pause, deviation)


class _LatencyChannel:
    """Latencies of requests (checks, sends) and how overdue the pending one is."""

    def __init__(self, detector: PhiAccrualFailureDetector) -> None:
        self.detector = detector
        self.pending_since: float | None = None  # a request begun and not answered yet
        self.last: float | None = None  # the last answered request's latency
        # The phi of the last latency against the history before it (it is judged by what
        # came before; in a short history it would widen its own yardstick).
        self._surprise = 0.0
        self._measured: list[float] | None = []  # the first WARMUP latencies, then None

    def answered(self, latency: float) -> None:
        self._surprise = self.detector.phi_after(latency)
        # Every answered latency is kept, so a link that has become slower for good stops
        # being suspected once that is the norm; only the rise is suspicious.
        if self._measured is not None:
            self._measured.append(latency)
            if len(self._measured) >= WARMUP:
                # Enough measured: the made-up intervals would only blur a short history.
                self.detector.reset_history(self._measured)
                self._measured = None
            else:
                self.detector.add_interval(latency)
        else:
            self.detector.add_interval(latency)
        self.last = latency
        self.pending_since = None

    def level(self, now: float) -> float:
        if self.pending_since is not None:
            waited = self.detector.phi_after(max(now - self.pending_since, 0.0))
        elif self.last is None:
            return 0.0
        else:
            waited = self._surprise
        # As usual (up to two deviations past the mean) reads 0; only the excess counts.
        return max(waited - _PHI_USUAL, 0.0)


class ComponentSuspicion:
    """One component's suspicion (phi) from its checks and, for a transport, its sends.

    ``interval`` is the health interval (the expected time between passing checks) and
    ``timeout`` the check timeout.  Not thread-safe beyond its detectors: the manager calls
    it under its lock.
    """

    def __init__(self, *, threshold: float, interval: float, timeout: float) -> None:
        self.threshold = check.number("threshold", threshold, allow_zero=False)
        scale = check.seconds("interval", interval) / AKKA_HEARTBEAT_INTERVAL
        response = check.seconds("timeout", timeout) / 10
        self.arrivals = PhiAccrualFailureDetector(
            threshold=self.threshold,
            min_std_deviation=AKKA_MIN_STD_DEVIATION * scale,
            acceptable_heartbeat_pause=AKKA_ACCEPTABLE_HEARTBEAT_PAUSE * scale,
            first_heartbeat_estimate=AKKA_HEARTBEAT_INTERVAL * scale,
        )

        def latency_detector() -> PhiAccrualFailureDetector:
            # A response is expected in a tenth of the timeout until measured; the pause
            # is 0, since a late answer is exactly what this channel is for.
            return PhiAccrualFailureDetector(
                threshold=self.threshold,
                min_std_deviation=response / 10,
                acceptable_heartbeat_pause=0.0,
                first_heartbeat_estimate=response,
            )

        self.checks = _LatencyChannel(latency_detector())
        self.sends = _LatencyChannel(latency_detector())
        self._suspected = False
        self._check_started: float | None = None

    def check_started(self, now: float) -> None:
        """A health check began at ``now``."""
        self._check_started = now
        if self.checks.pending_since is None:
            self.checks.pending_since = now

    def check_finished(self, now: float, ok: bool) -> None:
        """The health check begun last ended at ``now``, passing or not."""
        begun = self._check_started if self._check_started is not None else now
        self._check_started = None
        if not ok:
            # No answer: the request stays pending since the first unanswered one, and its
            # phi keeps rising.
            if self.checks.pending_since is None:
                self.checks.pending_since = begun
            return
        self.arrivals.heartbeat(now)
        self.checks.answered(max(now - begun, 0.0))
        # The component answers: a failed send before this check is no longer news.
        self.sends.pending_since = None

    def send_finished(self, now: float, latency: float, ok: bool) -> None:
        """A send that took ``latency`` seconds ended at ``now``."""
        if ok:
            self.sends.answered(latency)
        elif self.sends.pending_since is None:
            self.sends.pending_since = now - latency

    def level(self, now: float) -> float:
        """The suspicion at ``now``: the largest phi of arrivals, checks and sends; under
        ``NEGLIGIBLE`` it reads 0."""
        arrivals = max(self.arrivals.phi(now) - _PHI_USUAL, 0.0)
        level = max(arrivals, self.checks.level(now), self.sends.level(now))
        return level if level >= NEGLIGIBLE else 0.0

    def crossed(self, now: float) -> float | None:
        """The level if it has just risen to the threshold (once per crossing), else None."""
        level = self.level(now)
        if level >= self.threshold:
            if not self._suspected:
                self._suspected = True
                return level
            return None
        self._suspected = False
        return None
