"""What the manager knows about each component: status, outage times, counters, snapshots.

Nothing here locks: the manager's lock guards every ``ComponentState`` and ``Counters``;
``SendTallies`` has a writer per thread and a lock only for readers.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from dwcp._health import (
    ComponentHealth,
    ComponentMetrics,
    ComponentStatus,
    HealthSnapshot,
    LatencyHistogram,
    MetricsSnapshot,
)
from dwcp._latency import SEND_BUCKETS, LatencyRecorder
from dwcp._recovery import RecoveryPolicy, RestartSupervisor
from dwcp._suspicion import ComponentSuspicion

if TYPE_CHECKING:
    from dwcp._prediction import SchedulePlan
    from dwcp._slots import Slot

__all__ = [
    "ComponentState",
    "Counters",
    "SendTallies",
    "ThreadCount",
    "health_snapshot",
    "metrics_snapshot",
]


class Waiter:
    """Wakes whoever waits on a batch of checks when the last one ends, or on shutdown."""

    def __init__(self, outstanding: int) -> None:
        self.event = threading.Event()
        self._outstanding = outstanding
        self._lock = threading.Lock()
        if outstanding == 0:
            self.event.set()

    def one_done(self) -> None:
        with self._lock:
            self._outstanding -= 1
            if self._outstanding <= 0:
                self.event.set()


@dataclass(eq=False)
class Check:
    """A health check in flight; passes that overlap it share its result."""

    waiters: list[Waiter]
    done: bool = False
    error: str | None = None
    timed_out: bool = False


@dataclass(eq=False)
class Cycle:
    """A recovery cycle in flight; at most one per component."""

    policy: RecoveryPolicy
    done: threading.Event = field(default_factory=threading.Event)
    recovered: bool = False
    #: A learned wait schedule (``RecoveryPolicy(predictive=True)``), else the policy's own.
    waits: tuple[float, ...] | None = None
    #: What ``waits`` is searched from, by the cycle's own thread, off the manager's lock.
    plan: SchedulePlan | None = None


@dataclass(eq=False)
class ComponentState:
    """One component: its slot, where it stands, and what it went through."""

    slot: Slot
    since: float
    supervisor: RestartSupervisor
    status: ComponentStatus = "healthy"
    last_error: str | None = None
    down_since: float | None = None
    downtime: float = 0.0
    check: Check | None = None
    cycle: Cycle | None = None
    checks: int = 0
    check_failures: int = 0
    attempts: int = 0
    succeeded: int = 0
    failed: int = 0
    #: Phi accrual suspicion, created by the monitor at the first check.
    suspicion: ComponentSuspicion | None = None

    @property
    def name(self) -> str:
        return self.slot.name

    def set_status(self, status: ComponentStatus, now: float) -> None:
        if self.status != status:
            self.status, self.since = status, now

    def mark_down(self, now: float, error: str | None) -> None:
        if self.down_since is None:
            self.down_since = now
        if error is not None:
            self.last_error = error

    def mark_healthy(self, now: float) -> float:
        """Healthy again; returns how long the outage that ends here lasted."""
        downtime = 0.0
        if self.down_since is not None:
            downtime = now - self.down_since
            self.downtime += downtime
            self.down_since = None
        self.last_error = None
        self.set_status("healthy", now)
        return downtime

    def restart_clean(self, now: float) -> None:
        """Forget the last run's status (the manager is starting)."""
        self.status, self.last_error, self.since, self.down_since = "healthy", None, now, None

    def downtime_at(self, now: float) -> float:
        return self.downtime + (now - self.down_since if self.down_since is not None else 0.0)


@dataclass
class Counters:
    """Manager-wide counters (sends are in ``SendTallies``)."""

    health_checks: int = 0
    component_checks: int = 0
    recovery_attempts: int = 0
    recoveries_succeeded: int = 0
    recoveries_failed: int = 0
    send_errors: int = 0
    #: Guarded calls (``call()``, ``@guard``) that raised a failure that counted against the
    #: breaker, and that the breaker rejected (those that returned are a ``ThreadCount``).
    call_errors: int = 0
    call_rejections: int = 0


class ThreadCount:
    """A count kept in one cell per counting thread, so that counting takes no lock.

    Each cell has a single writer; ``total()`` sums them under a lock only readers and a
    thread's first count take.  The cells of threads that ended are kept: their counts stay.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._cells: list[list[int]] = []

    def add(self) -> None:
        """Count one, in the calling thread's cell."""
        try:
            self._local.cell[0] += 1
        except AttributeError:
            cell = [1]
            with self._lock:
                self._cells.append(cell)
            self._local.cell = cell

    def total(self) -> int:
        """The sum over every thread's cell."""
        with self._lock:
            return sum(cell[0] for cell in self._cells)


class SendTallies:
    """Sends, their bytes and a sample of their durations, one tally list per sending thread.

    A tally is ``[sends, bytes, seconds, count per SEND_BUCKETS bucket..., count above]``;
    ``seconds`` and the counts cover the timed sends only (a sample).
    Each has a single writer, so the send path takes no lock: one ``threading.local`` lookup
    it pays anyway, where a shared histogram would add a lock per send.
    """

    def __init__(self) -> None:
        #: ``local.value`` is the calling thread's tally, once ``new_tally()`` made it.
        self.local = threading.local()
        self._lock = threading.Lock()
        self._tallies: list[list[float]] = []

    def new_tally(self) -> list[float]:
        """The calling thread's tally, made and registered on its first send."""
        # [sends, bytes, seconds, one count per bucket and one above]
        tally: list[float] = [0, 0, 0.0] + [0] * (len(SEND_BUCKETS) + 1)
        with self._lock:
            self._tallies.append(tally)
        self.local.value = tally
        return tally

    @staticmethod
    def observe(tally: list[float], seconds: float) -> None:
        """Put a timed send's duration, successful or not, into ``tally``'s histogram."""
        tally[2] += seconds
        tally[3 + bisect_left(SEND_BUCKETS, seconds)] += 1

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return int(sum(t[0] for t in self._tallies)), int(sum(t[1] for t in self._tallies))

    def histogram(self) -> LatencyHistogram:
        """The timed sends' durations (a sample, successes and failures) as a histogram."""
        with self._lock:
            tallies = [list(t) for t in self._tallies]
        counts = [int(sum(t[3 + i] for t in tallies)) for i in range(len(SEND_BUCKETS) + 1)]
        cumulative, running = [], 0
        for count in counts[:-1]:
            running += count
            cumulative.append(running)
        total = float(sum(t[2] for t in tallies))
        return LatencyHistogram(SEND_BUCKETS, tuple(cumulative), running + counts[-1], total)


def health_snapshot(
    states: Iterable[ComponentState], now: float, breaker_state: str, storage: str
) -> HealthSnapshot:
    """Every component's health at ``now`` (caller holds the lock)."""
    components = {
        s.name: ComponentHealth(
            s.name,
            s.status,
            s.last_error,
            now - s.since,
            s.suspicion.level(now) if s.suspicion is not None else 0.0,
        )
        for s in states
    }
    return HealthSnapshot(MappingProxyType(components), breaker_state, storage)


def metrics_snapshot(
    states: Iterable[ComponentState],
    now: float,
    counters: Counters,
    tallies: SendTallies,
    latency: LatencyRecorder,
    *,
    transitions: Mapping[tuple[str, str], int],
    rejections: int,
    storage: str,
    storage_errors: int,
    events_dropped: int,
    calls: int = 0,
) -> MetricsSnapshot:
    """The counters and per-component figures at ``now`` (caller holds the lock)."""
    states = list(states)
    sends = tallies.totals()
    recovery_seconds, check_seconds = latency.snapshot()
    downtime = {s.name: s.downtime_at(now) for s in states}
    per_component = {
        s.name: ComponentMetrics(
            status=s.status,
            checks=s.checks,
            check_failures=s.check_failures,
            recovery_attempts=s.attempts,
            recoveries_succeeded=s.succeeded,
            recoveries_failed=s.failed,
            downtime_seconds=downtime[s.name],
        )
        for s in states
    }
    return MetricsSnapshot(
        health_checks=counters.health_checks,
        component_checks=counters.component_checks,
        recovery_attempts=counters.recovery_attempts,
        recoveries_succeeded=counters.recoveries_succeeded,
        recoveries_failed=counters.recoveries_failed,
        breaker_state_changes=sum(transitions.values()),
        breaker_rejections=rejections,
        sends=sends[0],
        sent_bytes=sends[1],
        send_errors=counters.send_errors,
        downtime_seconds=MappingProxyType(downtime),
        component_status=MappingProxyType({s.name: s.status for s in states}),
        breaker_storage=storage,
        breaker_storage_errors=storage_errors,
        breaker_transitions=MappingProxyType(dict(transitions)),
        components=MappingProxyType(per_component),
        events_dropped=events_dropped,
        calls=calls,
        call_errors=counters.call_errors,
        call_rejections=counters.call_rejections,
        send_seconds=tallies.histogram(),
        recovery_seconds=recovery_seconds,
        health_check_seconds=check_seconds,
    )
