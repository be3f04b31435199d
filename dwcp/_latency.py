"""Thread-safe latency histograms the Manager feeds and ``metrics()`` reads.

``observe_send`` runs on the send path of every sending thread, so it takes no lock: each
thread counts into a cell of its own, and a snapshot adds the cells up.  Cells of threads
that have ended are folded into one total, so memory stays bounded however many threads send.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Mapping
from types import MappingProxyType

from dwcp.health import LatencyHistogram

__all__ = ["CHECK_BUCKETS", "RECOVERY_BUCKETS", "SEND_BUCKETS", "LatencyRecorder"]

#: A queued send returns in microseconds, an acknowledged one in a round trip or more.
SEND_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Health checks are bounded by ``health_check_timeout`` (5 s by default).
CHECK_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: A recovery cycle waits 1 + 2 + 4 s before its attempts at the defaults; it may take minutes.
RECOVERY_BUCKETS = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# Sweep the cells of ended threads once there are this many.
_SWEEP_AT = 64


class _Histogram:
    """One histogram: per-thread cells of ``len(bounds) + 1`` bucket counts and a sum."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"bounds must be distinct and ascending, got {bounds!r}")
        self._bounds = bounds
        self._local = threading.local()
        self._lock = threading.Lock()
        # Live cells by owning thread; ``_retired`` holds what ended threads counted.
        self._cells: list[tuple[threading.Thread, list[float]]] = []
        self._retired = [0.0] * (len(bounds) + 2)

    def observe(self, seconds: float) -> None:
        if math.isnan(seconds):
            return
        cell: list[float] | None = getattr(self._local, "cell", None)
        if cell is None:
            cell = self._new_cell()
        # Only this thread writes this cell, so no lock; a reader may see it one step behind.
        cell[bisect_left(self._bounds, seconds)] += 1
        cell[-1] += max(seconds, 0.0)

    def _new_cell(self) -> list[float]:
        cell = [0.0] * (len(self._bounds) + 2)
        with self._lock:
            if len(self._cells) >= _SWEEP_AT:
                self._sweep()
            self._cells.append((threading.current_thread(), cell))
        self._local.cell = cell
        return cell

    def _sweep(self) -> None:
        # Caller holds the lock.  An ended thread can no longer write its cell: fold it in.
        live = []
        for thread, cell in self._cells:
            if thread.is_alive():
                live.append((thread, cell))
            else:
                for i, value in enumerate(cell):
                    self._retired[i] += value
        self._cells = live

    def snapshot(self) -> LatencyHistogram:
        with self._lock:
            self._sweep()
            totals = list(self._retired)
            cells = [cell for _, cell in self._cells]
        for cell in cells:
            for i, value in enumerate(cell):
                totals[i] += value
        cumulative, running = [], 0
        for value in totals[: len(self._bounds)]:
            running += int(value)
            cumulative.append(running)
        count = running + int(totals[len(self._bounds)])
        return LatencyHistogram(self._bounds, tuple(cumulative), count, totals[-1])


class LatencyRecorder:
    """Send, recovery and health-check durations for one manager; every method thread-safe."""

    def __init__(self) -> None:
        self._send = _Histogram(SEND_BUCKETS)
        self._lock = threading.Lock()
        self._recovery: dict[str, _Histogram] = {}
        self._checks: dict[str, _Histogram] = {}

    def observe_send(self, seconds: float) -> None:
        """One transport send took ``seconds`` (whether it succeeded or raised)."""
        self._send.observe(seconds)

    def observe_recovery(self, component: str, seconds: float) -> None:
        """One recovery cycle of ``component`` took ``seconds``, start to success or failure."""
        self._histogram(self._recovery, component, RECOVERY_BUCKETS).observe(seconds)

    def observe_health_check(self, component: str, seconds: float) -> None:
        """One health check of ``component`` took ``seconds`` (its timeout, if it hung)."""
        self._histogram(self._checks, component, CHECK_BUCKETS).observe(seconds)

    def snapshot(
        self,
    ) -> tuple[LatencyHistogram, Mapping[str, LatencyHistogram], Mapping[str, LatencyHistogram]]:
        """``(send, recovery by component, health check by component)``, for ``metrics()``."""
        with self._lock:
            recovery, checks = dict(self._recovery), dict(self._checks)
        return (
            self._send.snapshot(),
            MappingProxyType({name: h.snapshot() for name, h in recovery.items()}),
            MappingProxyType({name: h.snapshot() for name, h in checks.items()}),
        )

    def _histogram(
        self, table: dict[str, _Histogram], component: str, bounds: tuple[float, ...]
    ) -> _Histogram:
        histogram = table.get(component)
        if histogram is None:
            with self._lock:
                histogram = table.setdefault(component, _Histogram(bounds))
        return histogram
