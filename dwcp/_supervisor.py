"""Recovery: one cycle per component at a time, restart intensity, and what a pass leads to.

A cycle backs off, restarts the component and verifies it with a fresh check, through
``run_recovery`` (tenacity).  It runs on a ``dwcp-recovery-<name>`` thread, or in a caller's
thread for ``Manager.attempt_component_recovery()``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from loguru import logger

from dwcp._clock import Clock
from dwcp._errors import DWCPError
from dwcp._events import (
    ComponentEscalated,
    ComponentSuspected,
    ComponentUnhealthy,
    RecoveryAttempt,
    RecoveryFailed,
    RecoveryStarted,
    RecoverySucceeded,
    _Dispatcher,
)
from dwcp._health import ComponentStatus
from dwcp._latency import LatencyRecorder
from dwcp._monitor import Monitor
from dwcp._recovery import Admission, run_recovery
from dwcp._status import ComponentState, Counters, Cycle
from dwcp._validation import describe

__all__ = ["Supervisor"]

# The cycle the calling thread runs, if any (a recovery thread, or recover_now's caller).
_running = threading.local()


class Supervisor:
    """Turns check results into recovery cycles and runs them; state changes under ``lock``."""

    def __init__(
        self,
        lock: threading.RLock,
        states: Mapping[str, ComponentState],
        counters: Counters,
        monitor: Monitor,
        events: _Dispatcher,
        clock: Clock,
        latency: LatencyRecorder,
        *,
        on_transport_recovered: Callable[[], None],
    ) -> None:
        self._latency = latency
        self._lock = lock
        self._states = states
        self._counters = counters
        self._monitor = monitor
        self._events = events
        self._clock = clock
        self._on_transport_recovered = on_transport_recovered
        self._recoveries: set[threading.Thread] = set()

    def threads(self) -> list[threading.Thread]:
        """Recovery threads still running (caller holds the lock)."""
        return list(self._recoveries)

    def cycles(self) -> list[Cycle]:
        """Cycles in flight, in recovery threads or in callers' threads (caller holds the lock)."""
        return [s.cycle for s in self._states.values() if s.cycle is not None]

    def begin_degraded(
        self, failed: Mapping[str, DWCPError]
    ) -> list[tuple[ComponentState, Cycle, str]]:
        """Begin a cycle for each component that failed to start (caller holds the lock)."""
        pending = []
        for name, exc in failed.items():
            state = self._states[name]
            cycle, _ = self.begin_cycle(state, str(exc))
            if cycle is not None:
                pending.append((state, cycle, str(exc)))
        return pending

    def launch_degraded(
        self, pending: list[tuple[ComponentState, Cycle, str]], stop: threading.Event
    ) -> None:
        """Announce and run the cycles ``begin_degraded`` registered."""
        for state, cycle, error in pending:
            logger.bind(component=state.name, error=error).warning(
                "Component failed to start; recovering: {}: {}", state.name, error
            )
            self._events.publish(ComponentUnhealthy(state.name, error))
            self.spawn(state, cycle, stop)

    @staticmethod
    def join(threads: list[threading.Thread], cycles: list[Cycle], deadline: float) -> None:
        """Join ``threads`` and wait for ``cycles`` by one monotonic ``deadline``.

        One deadline for all, so many hung threads cost one timeout, not one each. The
        calling thread and its own cycle are skipped (``stop()`` called from a listener or a
        component's ``start()`` during recovery): they end once the caller returns.
        """
        current = threading.current_thread()
        mine = getattr(_running, "cycle", None)
        cycles = [cycle for cycle in cycles if cycle is not mine]
        for thread in threads:
            if thread is current:
                continue
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                logger.bind(thread=thread.name).warning(
                    "Thread did not stop in time; a component call is hung: {}", thread.name
                )
        # No cycle may restart a component after the manager closes it.
        for cycle in cycles:
            if not cycle.done.wait(max(deadline - time.monotonic(), 0.0)):
                logger.warning("Recovery cycle did not end in time; a component call is hung")

    # -- a pass ---------------------------------------------------------------------------------

    def run_pass(self, stop: threading.Event, *, recover: Callable[[], bool]) -> None:
        """Check every component not in a cycle, then hand the unhealthy ones to recovery.

        ``recover()`` is read under the lock after the checks: whether the manager still runs.
        """
        with self._lock:
            # A component in a recovery cycle is verified by that cycle, not by the monitor.
            states = [s for s in self._states.values() if s.cycle is None]
            self._counters.health_checks += 1
        results = self._monitor.run_checks(states, stop)
        to_recover: list[tuple[ComponentState, Cycle]] = []
        escalated: list[ComponentState] = []
        unhealthy: list[tuple[str, str]] = []
        suspected: list[tuple[str, float, float]] = []
        with self._lock:
            now = self._clock.now()
            may_recover = recover() and not stop.is_set()
            for state in states:
                if state.suspicion is not None:
                    level = state.suspicion.crossed(now)
                    if level is not None:
                        suspected.append((state.name, level, state.suspicion.threshold))
                error = results[state.name]
                if error is None:
                    if state.cycle is None and state.status != "healthy":
                        # Healthy again without a cycle (one gave up): an outage to learn.
                        state.supervisor.healed(now, state.down_since)
                        state.mark_healthy(now)
                    continue
                state.mark_down(now, error)
                if state.cycle is not None:
                    continue  # a cycle began while we checked; it decides what happens next
                if may_recover:
                    cycle, admission = self.begin_cycle(state, error)
                    if cycle is not None:
                        to_recover.append((state, cycle))
                    elif admission == "escalate":
                        escalated.append(state)
                elif state.status == "healthy":
                    state.set_status("unhealthy", now)
                unhealthy.append((state.name, error))
        for name, level, threshold in suspected:
            logger.bind(component=name, suspicion=level, threshold=threshold).warning(
                "Component suspected: {} (phi {:.1f} >= {:g})", name, level, threshold
            )
            self._events.publish(ComponentSuspected(name, level, threshold))
        for name, error in unhealthy:
            bound = logger.bind(component=name, error=error)
            if name == "transport":
                bound.warning("Transport layer unhealthy: {}", error)
            else:
                bound.error("Component health check failed: {}: {}", name, error)
            self._events.publish(ComponentUnhealthy(name, error))
        for state in escalated:
            self.announce_escalation(state, "escalate")
        for state, cycle in to_recover:
            self.spawn(state, cycle, stop)

    # -- cycles ---------------------------------------------------------------------------------

    def begin_cycle(
        self, state: ComponentState, error: str | None
    ) -> tuple[Cycle | None, Admission]:
        """Register a cycle unless restart intensity forbids it (caller holds the lock).

        Registering here, under the lock, is what prevents overlapping cycles.
        """
        now = self._clock.now()
        state.mark_down(now, error)
        admission = state.supervisor.admit(now)
        if admission != "run":
            state.set_status("failed", now)
            return None, admission
        # A snapshot only: the search for learned waits runs on the cycle's thread.
        cycle = Cycle(
            state.supervisor.cycle_policy(),
            plan=state.supervisor.cycle_plan(now, state.down_since),
        )
        state.cycle = cycle
        state.set_status("recovering", now)
        return cycle, admission

    def announce_escalation(self, state: ComponentState, admission: Admission) -> None:
        if admission != "escalate":
            return
        policy = state.supervisor.policy
        logger.bind(
            component=state.name, cycles=policy.max_cycles, window=policy.cycle_window
        ).error(
            "Component restart intensity exceeded; escalating: {} ({} cycles in {:g}s)",
            state.name,
            policy.max_cycles,
            policy.cycle_window,
        )
        self._events.publish(
            ComponentEscalated(state.name, policy.max_cycles or 0, policy.cycle_window)
        )

    def spawn(self, state: ComponentState, cycle: Cycle, stop: threading.Event) -> None:
        """Run ``cycle`` on its own named thread, unless the manager is stopping."""
        thread = threading.Thread(
            target=self.recover,
            args=(state, cycle, stop),
            name=f"dwcp-recovery-{state.name}",
            daemon=True,
        )
        with self._lock:
            if stop.is_set():
                self._end_cycle(state, cycle, recovered=False, cancelled=True)
                return
            self._recoveries.add(thread)
        thread.start()

    def recover_now(self, name: str, error: BaseException | None, stop: threading.Event) -> bool:
        """Run a cycle for ``name`` in this thread, or wait for the one in flight.

        Caller has checked the manager is started; returns whether the component ended healthy.
        """
        with self._lock:
            state = self.state(name)
            cycle = state.cycle
            owner = cycle is None
            admission: Admission = "run"
            if cycle is None:
                cycle, admission = self.begin_cycle(state, describe(error) if error else None)
        if cycle is None:
            self.announce_escalation(state, admission)
            return False
        if owner:
            self.recover(state, cycle, stop)
        else:
            cycle.done.wait()
        return cycle.recovered

    def reset(self, name: str) -> None:
        """Clear escalation and restart history so recovery may run again."""
        with self._lock:
            state = self.state(name)
            state.supervisor.reset()
            if state.status == "failed":
                state.set_status("unhealthy", self._clock.now())
        logger.bind(component=name).info("Component reset: {}", name)

    def state(self, name: str) -> ComponentState:
        try:
            return self._states[name]
        except KeyError:
            known = ", ".join(self._states) or "none"
            raise ValueError(f"unknown component {name!r} (configured: {known})") from None

    def recover(self, state: ComponentState, cycle: Cycle, stop: threading.Event) -> None:
        """Run one cycle to its end: back off, restart, verify, at most the policy's attempts."""
        _running.cycle = cycle  # join() skips it when this thread is the one stopping
        try:
            self._recover(state, cycle, stop)
        finally:
            _running.cycle = None

    def _recover(self, state: ComponentState, cycle: Cycle, stop: threading.Event) -> None:
        name = state.name
        began = self._clock.now()
        if cycle.plan is not None:
            # Learned waits are searched here, off the lock (health(), stop() and failed
            # sends never wait for it); the search's own time comes off the first wait.
            waits = cycle.plan.waits()
            if waits is not None:
                searched = max(self._clock.now() - began, 0.0)
                waits = (max(waits[0] - searched, 0.0), *waits[1:])
            cycle.waits = waits
        log = logger.bind(component=name)
        log.bind(error=state.last_error).info(
            "Attempting component recovery: {} ({})", name, state.last_error
        )
        self._events.publish(RecoveryStarted(name, state.last_error))

        def action() -> None:
            if stop.is_set():
                raise DWCPError("manager is stopping", code="NOT_STARTED")
            with self._lock:
                self._counters.recovery_attempts += 1
                state.attempts += 1
            state.slot.restart()

        def verify() -> None:
            # A monitor check that began before the restart says nothing about it: let it
            # end, then check afresh.
            self._monitor.await_check_in_flight(state, stop)
            error = self._monitor.run_checks([state], stop)[name]
            if error is not None:
                raise RuntimeError(f"health check after restart failed: {error}")

        def on_attempt(attempt: int, backoff: float) -> None:
            with self._lock:
                state.supervisor.attempt_started(self._clock.now() + backoff)
            log.bind(attempt=attempt, backoff=backoff).info(
                "Recovery attempt: {} #{} after {:g}s", name, attempt, backoff
            )
            self._events.publish(RecoveryAttempt(name, attempt, backoff))

        def on_failure(attempt: int, exc: BaseException) -> None:
            with self._lock:
                state.supervisor.attempt_failed(self._clock.now())
            log.bind(attempt=attempt, error=describe(exc)).warning(
                "Recovery attempt failed: {} #{}: {}", name, attempt, describe(exc)
            )

        outcome = None
        try:
            outcome = run_recovery(
                action,
                verify,
                cycle.policy,
                sleep=lambda seconds: self._clock.sleep(seconds, stop),
                on_attempt=on_attempt,
                on_failure=on_failure,
                waits=cycle.waits,
            )
        finally:
            recovered = outcome is not None and outcome.recovered
            cancelled = outcome is None or outcome.cancelled or stop.is_set()
            with self._lock:
                downtime = self._end_cycle(
                    state,
                    cycle,
                    recovered=recovered,
                    cancelled=cancelled,
                    error=outcome.error if outcome is not None else None,
                    attempt=outcome.attempts if outcome is not None else None,
                )
                self._recoveries.discard(threading.current_thread())
            if not cancelled:
                self._latency.observe_recovery(name, self._clock.now() - began)
        assert outcome is not None
        if recovered:
            if state.slot.is_transport:
                # The peer is back: let the next send be the trial instead of waiting out
                # the reset timeout.
                self._on_transport_recovered()
            log.bind(attempt=outcome.attempts, downtime=downtime).info(
                "Component recovered successfully: {} after {} attempt(s), down {:.3f}s",
                name,
                outcome.attempts,
                downtime,
            )
            self._events.publish(RecoverySucceeded(name, outcome.attempts, downtime))
        elif not cancelled:
            error = describe(outcome.error) if outcome.error else None
            log.bind(attempt=outcome.attempts, error=error).error(
                "Component recovery failed after all attempts: {} ({} attempts): {}",
                name,
                outcome.attempts,
                error,
            )
            self._events.publish(RecoveryFailed(name, outcome.attempts, error))

    def _end_cycle(
        self,
        state: ComponentState,
        cycle: Cycle,
        *,
        recovered: bool,
        cancelled: bool,
        error: BaseException | None = None,
        attempt: int | None = None,
    ) -> float:
        # Caller holds the lock.  Returns the downtime this outage lasted (0 if still down).
        now = self._clock.now()
        downtime = 0.0
        status: ComponentStatus
        if recovered:
            down_since = state.down_since
            downtime = state.mark_healthy(now)
            state.supervisor.recovered(now, down_since=down_since, attempt=attempt)
            self._counters.recoveries_succeeded += 1
            state.succeeded += 1
        else:
            status = "unhealthy" if cancelled else "failed"
            state.set_status(status, now)
            if not cancelled:
                self._counters.recoveries_failed += 1
                state.failed += 1
        if error is not None and not recovered:
            state.last_error = describe(error)
        state.cycle = None
        cycle.recovered = recovered
        cycle.done.set()
        return downtime
