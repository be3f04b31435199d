"""Health checks: each on its own thread, bounded by one deadline per batch, shared when they overlap.

The monitor never restarts anything; it reports each component's check result to whoever
runs the pass (the supervisor decides what follows).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from loguru import logger

from dwcp._clock import Clock, SystemClock
from dwcp._latency import LatencyRecorder
from dwcp._status import Check, ComponentState, Counters, Waiter
from dwcp._suspicion import ComponentSuspicion

__all__ = ["Monitor"]

INTERRUPTED = "health check interrupted by shutdown"


class Monitor:
    """Runs checks under the manager's lock discipline: state changes locked, checks not.

    ``lock`` is the manager's lock; it guards every ``ComponentState`` and ``counters``.
    """

    def __init__(
        self,
        lock: threading.RLock,
        counters: Counters,
        latency: LatencyRecorder,
        *,
        interval: float,
        timeout: float,
        clock: Clock | None = None,
    ) -> None:
        self._lock = lock
        self._counters = counters
        self._latency = latency
        self.interval = interval
        self.timeout = timeout
        self._waiters: set[Waiter] = set()
        self._thread: threading.Thread | None = None
        #: Where check times for suspicion are read: the manager's clock.
        self.clock: Clock = clock or SystemClock()

    def suspicion(self, state: ComponentState) -> ComponentSuspicion:
        """The component's suspicion, created on first use (caller holds the lock)."""
        if state.suspicion is None:
            state.suspicion = ComponentSuspicion(
                threshold=state.supervisor.policy.suspicion_threshold,
                interval=self.interval,
                timeout=self.timeout,
            )
        return state.suspicion

    def send_finished(self, state: ComponentState, seconds: float, ok: bool) -> None:
        """A sampled send's latency (or failure) feeds the transport's suspicion."""
        with self._lock:
            self.suspicion(state).send_finished(self.clock.now(), seconds, ok)

    @property
    def thread(self) -> threading.Thread | None:
        """The monitoring thread while it runs."""
        return self._thread

    def start(self, run_pass: Callable[[threading.Event], None], stop: threading.Event) -> None:
        """Start ``dwcp-monitor``: ``run_pass(stop)`` every ``interval`` until ``stop`` is set."""

        def loop() -> None:
            while not stop.wait(self.interval):
                try:
                    run_pass(stop)
                except Exception as exc:  # noqa: BLE001
                    # The loop must outlive any bug in a pass; log it and go on.
                    logger.opt(exception=exc).error("Health monitoring pass failed")

        self._thread = threading.Thread(target=loop, name="dwcp-monitor", daemon=True)
        self._thread.start()

    def forget_thread(self) -> None:
        self._thread = None

    def wake_all(self) -> None:
        """Release every waiter (shutdown); caller holds the lock."""
        for waiter in self._waiters:
            waiter.event.set()

    def run_checks(
        self, states: Iterable[ComponentState], stop: threading.Event
    ) -> dict[str, str | None]:
        """Check each component on its own thread; give up on those past the timeout.

        Returns each component's error, or None when healthy.  A check already running (from
        another pass, or ``check_component_health()``) is shared, not repeated: its result is
        this batch's too; only one still running at this batch's deadline counts as hung.
        """
        states = list(states)
        if stop.is_set():
            # Shutting down: touch no component (stop() is about to close them).
            return {s.name: INTERRUPTED for s in states}
        results: dict[str, str | None] = {}
        jobs: list[tuple[ComponentState, Check]] = []
        shared: list[tuple[ComponentState, Check]] = []
        # The timeout bounds the whole batch, starting threads included.
        deadline = time.monotonic() + self.timeout
        with self._lock:
            waiter = Waiter(len(states))
            self._waiters.add(waiter)
            if stop.is_set():
                waiter.event.set()
            for state in states:
                if state.check is not None:
                    state.check.waiters.append(waiter)
                    shared.append((state, state.check))
                    continue
                job = Check([waiter])
                state.check = job
                jobs.append((state, job))
                self.suspicion(state).check_started(self.clock.now())
            self._counters.component_checks += len(jobs)
        try:
            for state, job in jobs:
                # Daemon: a check that never returns is abandoned, never joined, and must not
                # keep the interpreter alive.
                threading.Thread(
                    target=self._check_thread,
                    args=(state, job),
                    name=f"dwcp-health-{state.name}",
                    daemon=True,
                ).start()
            waiter.event.wait(max(0.0, deadline - time.monotonic()))
        finally:
            hung: list[str] = []
            with self._lock:
                self._waiters.discard(waiter)
                for state, job in shared:
                    if waiter in job.waiters:
                        job.waiters.remove(waiter)  # a hung check must not collect them
                    results[state.name] = (
                        job.error
                        if job.done
                        else "previous health check is still running past the timeout"
                    )
                for state, job in jobs:
                    state.checks += 1
                    if job.done:
                        results[state.name] = job.error
                    elif stop.is_set():
                        results[state.name] = INTERRUPTED
                    else:
                        results[state.name] = f"health check timed out after {self.timeout:g}s"
                        # Timed as the timeout now; the check's own end is then not timed.
                        job.timed_out = True
                        hung.append(state.name)
                    if results[state.name] is not None:
                        state.check_failures += 1
            for name in hung:
                self._latency.observe_health_check(name, self.timeout)
        return results

    def await_check_in_flight(self, state: ComponentState, stop: threading.Event) -> None:
        """Wait (at most the check timeout) for a check started before us to end."""
        with self._lock:
            job = state.check
            if job is None:
                return
            waiter = Waiter(1)
            job.waiters.append(waiter)
            self._waiters.add(waiter)
            if stop.is_set():
                waiter.event.set()
        waiter.event.wait(self.timeout)
        with self._lock:
            self._waiters.discard(waiter)

    def _check_thread(self, state: ComponentState, job: Check) -> None:
        began = time.perf_counter()
        error = state.slot.check()
        seconds = time.perf_counter() - began
        with self._lock:
            job.error, job.done = error, True
            if state.check is job:
                state.check = None
            self.suspicion(state).check_finished(self.clock.now(), ok=error is None)
            waiters = list(job.waiters)
            timed = not job.timed_out
        if timed:
            self._latency.observe_health_check(state.name, seconds)
        for waiter in waiters:
            waiter.one_done()
