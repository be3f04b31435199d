"""The monitor thread and recovery cycles, through the Manager with fakes and real threads."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import pytest
from loguru import logger

import dwcp
from dwcp._latency import LatencyRecorder
from dwcp._monitor import Monitor
from dwcp._status import Counters
from dwcp.testing import FakeClock, FakeLayer, FakeTransport
from tests.conftest import wait_until

if TYPE_CHECKING:
    from loguru import Message

# "Prompt" on a busy machine: far below every wait these tests show is interrupted (30 s,
# 60 s, an hour, forever), far above any scheduling delay.
PROMPT = 5.0

MakeManager = Callable[..., dwcp.Manager]


E = TypeVar("E", bound=dwcp.Event)


class Events:
    """Collects manager events; waiting on them replaces sleeping."""

    def __init__(self) -> None:
        self.items: list[dwcp.Event] = []
        self._cond = threading.Condition()

    def __call__(self, event: dwcp.Event) -> None:
        with self._cond:
            self.items.append(event)
            self._cond.notify_all()

    def of(self, kind: type[E]) -> list[E]:
        with self._cond:
            return [e for e in self.items if isinstance(e, kind)]

    def wait_for(self, kind: type[E], count: int = 1, timeout: float = 5.0) -> list[E]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.of(kind)) >= count, timeout)
        assert ok, f"no {count} x {kind.__name__} within {timeout}s; saw {self.items}"
        return self.of(kind)


# -- monitoring ------------------------------------------------------------------------------


def test_one_named_monitor_thread_first_check_after_one_interval(
    make_manager: MakeManager,
) -> None:
    checked = threading.Event()
    checked_at: list[float] = []

    class Timed(FakeTransport):
        def health_check(self) -> None:
            checked_at.append(time.monotonic())
            checked.set()

    manager = make_manager(Timed(), health_interval=0.2)
    started = time.monotonic()
    manager.start()
    assert [t.name for t in threading.enumerate()].count("dwcp-monitor") == 1
    assert checked.wait(5)
    assert checked_at[0] - started >= 0.2
    wait_until(lambda: manager.metrics().health_checks >= 2)


def test_stop_interrupts_the_interval_wait(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport(), health_interval=3600)
    manager.start()
    began = time.monotonic()
    manager.stop()
    assert time.monotonic() - began < PROMPT


def test_check_pass_reports_each_component(make_manager: MakeManager) -> None:
    layer = FakeLayer()
    layer.healthy = False
    manager = make_manager(FakeTransport(), compression=layer, prediction=FakeLayer())
    health = manager.check_component_health()
    assert set(health) == {"transport", "compression", "prediction"}
    assert health["transport"].status == "healthy"
    assert health["compression"].status == "unhealthy"  # not started: nobody recovers it
    assert health["compression"].last_error == "is_healthy() returned False"


def test_hung_check_is_bounded_and_not_repeated(make_manager: MakeManager) -> None:
    hang = threading.Event()
    hung, other = FakeLayer(), FakeLayer()
    hung.hang = hang
    calls: list[int] = []
    original = hung.is_healthy

    def counting() -> bool:
        calls.append(1)
        return original()

    hung.is_healthy = counting  # type: ignore[method-assign]
    transport = FakeTransport()
    manager = make_manager(
        transport, compression=hung, sync=other, health_check_timeout=0.2, initial_backoff=3600
    )
    try:
        began = time.monotonic()
        health = manager.check_component_health()
        elapsed = time.monotonic() - began
        assert elapsed < PROMPT
        assert health["compression"].last_error == "health check timed out after 0.2s"
        assert health["transport"].healthy and health["sync"].healthy
        health = manager.check_component_health()
        assert health["compression"].last_error == (
            "previous health check is still running past the timeout"
        )
        assert len(calls) == 1
    finally:
        hang.set()
    wait_until(lambda: manager.check_component_health()["compression"].healthy)


def test_hung_check_does_not_stall_stop(make_manager: MakeManager) -> None:
    hang = threading.Event()
    layer = FakeLayer()
    layer.hang = hang
    manager = make_manager(
        FakeTransport(), compression=layer, health_interval=0.01, health_check_timeout=30
    )
    manager.start()
    try:
        wait_until(lambda: any(t.name == "dwcp-health-compression" for t in threading.enumerate()))
        began = time.monotonic()
        manager.stop()
        assert time.monotonic() - began < PROMPT
    finally:
        hang.set()


def test_loop_survives_an_exception_in_a_pass() -> None:
    monitor = Monitor(threading.RLock(), Counters(), LatencyRecorder(), interval=0.001, timeout=1.0)
    stop = threading.Event()
    passes = [0]
    survived = threading.Event()

    def flaky(_stop: threading.Event) -> None:
        passes[0] += 1
        if passes[0] <= 3:
            raise RuntimeError("bug in a pass")
        survived.set()

    monitor.start(flaky, stop)
    try:
        assert survived.wait(5)
        assert monitor.thread is not None and monitor.thread.name == "dwcp-monitor"
    finally:
        stop.set()
        assert monitor.thread is not None
        monitor.thread.join(5)
    assert not monitor.thread.is_alive()


def test_check_that_raises_marks_unhealthy_with_the_error(make_manager: MakeManager) -> None:
    class Raising(FakeLayer):
        def is_healthy(self) -> bool:
            raise ZeroDivisionError("codec table corrupt")

    manager = make_manager(compression=Raising())
    health = manager.check_component_health()
    assert health["compression"].last_error == "ZeroDivisionError: codec table corrupt"


# -- recovery --------------------------------------------------------------------------------


def test_transport_recovery_closes_then_starts_the_same_object(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    manager = make_manager(transport)
    manager.start()
    transport.calls.clear()
    assert manager.attempt_component_recovery("transport")
    assert transport.calls == ["close", "start", "health_check"]
    assert manager.metrics().recoveries_succeeded == 1


def test_layer_recovery_stops_then_starts_and_rechecks(make_manager: MakeManager) -> None:
    layer = FakeLayer()
    layer.healthy = False
    layer.heal_on_restart = True
    manager = make_manager(FakeTransport(), consensus=layer)
    manager.start()
    layer.calls.clear()
    assert manager.attempt_component_recovery("consensus", RuntimeError("quorum lost"))
    assert layer.calls == ["stop", "start"]
    assert manager.health().components["consensus"].status == "healthy"


def test_success_requires_the_health_recheck(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    transport.healthy = False  # restarts "work" but the peer stays unreachable
    events = Events()
    manager = make_manager(transport, max_retries=3)
    manager.add_listener(events)
    manager.start()
    assert not manager.attempt_component_recovery("transport")
    assert transport.calls.count("start") == 1 + 3
    health = manager.health().components["transport"]
    assert health.status == "failed"
    assert "peer unreachable" in (health.last_error or "")
    metrics = manager.metrics()
    assert metrics.recovery_attempts == 3
    assert metrics.recoveries_failed == 1 and metrics.recovery_success_rate == 0.0
    failed = events.wait_for(dwcp.RecoveryFailed)
    assert failed[0].attempts == 3
    attempts = events.wait_for(dwcp.RecoveryAttempt, 3)
    assert [e.backoff for e in attempts] == [0.001, 0.002, 0.004]


def test_unknown_component_and_not_started(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport())
    with pytest.raises(ValueError, match="unknown component 'sync'"):
        manager.attempt_component_recovery("sync")
    with pytest.raises(dwcp.DWCPError) as info:
        manager.attempt_component_recovery("transport")
    assert info.value.code == "NOT_STARTED"


def test_one_cycle_in_flight_per_component(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    manager = make_manager(transport, initial_backoff=0.2)
    manager.start()
    transport.healthy = False
    manager.check_component_health()  # hands transport to a recovery thread
    assert manager.health().components["transport"].status == "recovering"
    for _ in range(5):
        manager.check_component_health()  # must not start overlapping cycles
    recovery_threads = [t for t in threading.enumerate() if t.name == "dwcp-recovery-transport"]
    assert len(recovery_threads) == 1
    transport.healthy = True
    # A caller asking for recovery now waits for the cycle in flight instead of starting one.
    assert manager.attempt_component_recovery("transport")
    assert manager.metrics().recoveries_succeeded == 1
    assert transport.calls.count("start") == 2


def test_failed_component_gets_a_new_cycle_on_a_later_tick(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    transport.healthy = False
    manager = make_manager(transport)
    manager.start()
    assert not manager.attempt_component_recovery("transport")
    assert manager.health().components["transport"].status == "failed"
    transport.healthy = True
    manager.check_component_health()
    assert manager.health().components["transport"].status == "healthy"
    transport.healthy = False
    manager.check_component_health()
    wait_until(lambda: manager.metrics().recoveries_failed == 2)


def test_monitor_detects_and_recovers_a_transport(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    events = Events()
    manager = make_manager(transport, health_interval=0.02, initial_backoff=0.01)
    manager.add_listener(events)
    manager.start()
    transport.healthy = False
    events.wait_for(dwcp.ComponentUnhealthy)
    events.wait_for(dwcp.RecoveryAttempt, 2)
    transport.healthy = True
    succeeded = events.wait_for(dwcp.RecoverySucceeded)
    assert succeeded[0].component == "transport"
    assert manager.metrics().downtime_seconds["transport"] > 0


def test_verified_transport_recovery_half_opens_an_open_breaker(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    manager = make_manager(transport, max_failures=2, reset_timeout=3600)
    manager.start()
    transport.fail_sends = OSError("down")
    for _ in range(2):
        with pytest.raises(dwcp.TransportError):
            manager.send_with_circuit_breaker(b"x")
    assert manager.circuit_breaker_state == "open"
    transport.fail_sends = None
    assert manager.attempt_component_recovery("transport")
    assert manager.circuit_breaker_state == "half-open"
    manager.send_with_circuit_breaker(b"trial")
    assert manager.circuit_breaker_state == "closed"


def test_failed_recovery_leaves_the_breaker_open(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    manager = make_manager(transport, max_failures=1, reset_timeout=3600)
    manager.start()
    transport.fail_sends = OSError("down")
    with pytest.raises(dwcp.TransportError):
        manager.send_with_circuit_breaker(b"x")
    transport.healthy = False
    assert not manager.attempt_component_recovery("transport")
    assert manager.circuit_breaker_state == "open"


def test_stop_during_a_long_backoff_is_prompt_and_starts_no_attempt(
    make_manager: MakeManager,
) -> None:
    transport = FakeTransport()
    events = Events()
    manager = make_manager(transport, initial_backoff=60.0)  # attempts wait 60 s, 120 s...
    manager.add_listener(events)
    manager.start()
    transport.healthy = False
    manager.check_component_health()
    events.wait_for(dwcp.RecoveryAttempt)
    began = time.monotonic()
    manager.stop()
    assert time.monotonic() - began < PROMPT
    assert transport.calls.count("start") == 1  # no attempt ran
    assert manager.health().components["transport"].status == "unhealthy"


def test_the_default_schedule_waits_1_2_4_seconds_on_the_injected_clock(
    make_manager: MakeManager,
) -> None:
    """Three attempts after 1 s, 2 s and 4 s of the manager's clock, then the cycle gives up."""
    transport = FakeTransport()
    clock = FakeClock(start=100.0)
    events = Events()
    manager = make_manager(transport, initial_backoff=1.0, clock=clock)
    manager.add_listener(events)
    manager.start()
    transport.healthy = False
    manager.check_component_health()
    failed = events.wait_for(dwcp.RecoveryFailed)[0]
    assert clock.slept == [1.0, 2.0, 4.0]
    assert [e.backoff for e in events.of(dwcp.RecoveryAttempt)] == [1.0, 2.0, 4.0]
    assert failed.attempts == 3
    assert clock.now() == 107.0
    # Downtime is measured on the same clock: 7 s of backoff, no real time.
    assert manager.metrics().downtime_seconds["transport"] == 7.0


def test_stop_during_the_4s_backoff_with_the_real_schedule(make_manager: MakeManager) -> None:
    """Attempts 1 and 2 fail after the 1 s and 2 s waits; stop() lands in the 4 s one."""
    transport = FakeTransport()
    clock = FakeClock()
    clock.block_on(4.0)
    manager = make_manager(transport, initial_backoff=1.0, clock=clock)
    manager.start()
    transport.healthy = False
    manager.check_component_health()
    assert clock.blocked.wait(10)
    began = time.monotonic()
    manager.stop()
    assert time.monotonic() - began < PROMPT
    assert clock.slept == [1.0, 2.0, 4.0]
    assert transport.calls.count("start") == 1 + 2  # attempts 1 and 2 ran, 3 never did
    assert manager.metrics().recoveries_failed == 0  # cancelled, not failed


def test_no_attempt_after_stop_even_when_the_backoff_would_end(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    events = Events()
    manager = make_manager(transport, initial_backoff=0.3)
    manager.add_listener(events)
    manager.start()
    transport.healthy = False
    manager.check_component_health()
    events.wait_for(dwcp.RecoveryAttempt)
    manager.stop()
    starts = transport.calls.count("start")
    transport.healthy = True
    assert not any(t.name.startswith("dwcp-recovery") for t in threading.enumerate())
    assert transport.calls.count("start") == starts == 1


def test_thousand_failure_recovery_cycles_leak_no_threads(make_manager: MakeManager) -> None:
    baseline = threading.active_count()
    layer = FakeLayer()
    layer.heal_on_restart = True
    manager = make_manager(compression=layer, initial_backoff=0)
    manager.start()
    for _ in range(1000):
        layer.healthy = False
        assert manager.attempt_component_recovery("compression")
    metrics = manager.metrics()
    assert metrics.recoveries_succeeded == 1000 and metrics.recovery_attempts == 1000
    manager.stop()
    wait_until(lambda: threading.active_count() == baseline)


def test_listener_that_raises_does_not_stop_the_others(make_manager: MakeManager) -> None:
    events = Events()

    def broken(event: dwcp.Event) -> None:
        raise RuntimeError("listener bug")

    manager = make_manager(FakeTransport())
    manager.add_listener(broken)
    manager.add_listener(events)
    manager.start()
    assert manager.attempt_component_recovery("transport")
    events.wait_for(dwcp.RecoverySucceeded)
    manager.remove_listener(broken)
    with pytest.raises(ValueError):
        manager.remove_listener(broken)


def test_metrics_per_component_and_per_transition(make_manager: MakeManager) -> None:
    transport, layer = FakeTransport(), FakeLayer()
    manager = make_manager(transport, compression=layer, max_failures=1)
    manager.start()
    assert manager.monitor_alive
    layer.healthy = False
    manager.check_component_health()
    wait_until(lambda: manager.metrics().components["compression"].recoveries_failed == 1)
    transport.fail_sends = OSError("down")
    with pytest.raises(dwcp.TransportError):
        manager.send_with_circuit_breaker(b"x")
    assert manager.attempt_component_recovery("transport")
    metrics = manager.metrics()
    compression = metrics.components["compression"]
    assert compression.status == "failed"
    assert compression.recovery_attempts == 3 and compression.check_failures == 1 + 3
    assert metrics.components["transport"].recoveries_succeeded == 1
    assert dict(metrics.breaker_transitions) == {("closed", "open"): 1, ("open", "half-open"): 1}
    manager.stop()
    assert not manager.monitor_alive


def test_stop_waits_for_a_cycle_run_in_a_callers_thread(make_manager: MakeManager) -> None:
    """A recovery in the caller's thread cannot revive the transport after stop() closed it."""
    entered, release = threading.Event(), threading.Event()

    class SlowStart(FakeTransport):
        def start(self) -> None:
            if self.started:  # the restart inside recovery, not the first start
                entered.set()
                release.wait(5)
            super().start()

    transport = SlowStart()
    manager = make_manager(transport, initial_backoff=0)
    manager.start()
    caller = threading.Thread(target=manager.attempt_component_recovery, args=("transport",))
    caller.start()
    assert entered.wait(5)
    stopper = threading.Thread(target=manager.stop)
    stopper.start()
    wait_until(lambda: not manager.is_started)
    assert transport.closed == 1  # recovery's own close(); stop() has not closed it yet
    release.set()
    stopper.join(5)
    caller.join(5)
    assert transport.calls[-1] == "close"  # stop() closed it last, after the restart


def test_a_stuck_listener_stalls_neither_sends_nor_recovery(make_manager: MakeManager) -> None:
    stuck = threading.Event()
    release = threading.Event()

    def slow(event: dwcp.Event) -> None:
        stuck.set()
        release.wait(10)

    transport = FakeTransport()
    manager = make_manager(transport, max_failures=1)
    manager.add_listener(slow)
    manager.start()
    try:
        transport.fail_sends = OSError("down")
        with pytest.raises(dwcp.TransportError):
            manager.send_with_circuit_breaker(b"x")  # opens the breaker: an event
        assert stuck.wait(5)
        for _ in range(100):  # each rejection is another event for the stuck listener
            with pytest.raises(dwcp.CircuitOpenError):
                manager.send_with_circuit_breaker(b"x")
        transport.fail_sends = None
        assert manager.attempt_component_recovery("transport")
        manager.send_with_circuit_breaker(b"trial")
        assert manager.circuit_breaker_state == "closed"
    finally:
        release.set()


def test_a_pass_overlapping_a_slow_check_shares_its_result(make_manager: MakeManager) -> None:
    # A check that is slow (0.3 s) but within its timeout (1 s) is healthy for every pass
    # that overlaps it, and is run once, not twice; nothing is recovered.
    gate = threading.Event()
    calls: list[int] = []

    class Slow(FakeLayer):
        def is_healthy(self) -> bool:
            calls.append(1)
            gate.wait(5)
            return True

    transport, slow = FakeTransport(), Slow()
    manager = make_manager(transport, compression=slow, health_check_timeout=1.0)
    manager.start()
    first: list[object] = []
    runner = threading.Thread(target=lambda: first.append(manager.check_component_health()))
    runner.start()
    wait_until(lambda: calls == [1])
    threading.Timer(0.3, gate.set).start()
    second = manager.check_component_health()  # overlaps the first pass's check
    runner.join(5)
    assert second["compression"].healthy, second["compression"].last_error
    assert calls == [1]
    assert slow.calls == ["start"]  # never stopped or restarted by a recovery
    assert transport.closed == 0
    manager.stop()


# -- what the README promises about logs and timings -------------------------------------------


def test_log_messages_start_with_their_stable_texts_and_bind_their_fields(
    make_manager: MakeManager,
) -> None:
    """README.md, "Watching it": "Log messages start with a stable text and go on with the
    essentials, such as `Circuit breaker state changed: closed -> open (dwcp)`; the same
    values are bound fields (`component`, `attempt`, `backoff`, `error`, `state`,
    `previous`)", and the stable texts are the eight it lists."""
    records: list[tuple[str, dict[str, object]]] = []
    lock = threading.Lock()

    def sink(message: Message) -> None:
        with lock:
            records.append((message.record["message"], dict(message.record["extra"])))

    handler = logger.add(sink, level="DEBUG")
    logger.enable("dwcp")
    try:
        transport, layer = FakeTransport(), FakeLayer("sync")
        layer.heal_on_restart = True
        events = Events()
        manager = make_manager(transport, sync=layer, max_failures=1, clock=FakeClock())
        manager.add_listener(events)
        manager.start()
        transport.fail_sends = OSError("down")
        with pytest.raises(dwcp.TransportError):
            manager.send_with_circuit_breaker(b"x")  # max_failures=1: closed -> open
        transport.fail_sends = None
        transport.healthy, layer.healthy = False, False
        manager.check_component_health()  # the transport fails all attempts, sync heals
        events.wait_for(dwcp.RecoveryFailed)
        events.wait_for(dwcp.RecoverySucceeded)
    finally:
        logger.disable("dwcp")
        logger.remove(handler)

    def first(text: str, **fields: object) -> dict[str, object]:
        """The bound fields of the first record starting with ``text`` and carrying ``fields``."""
        with lock:
            for message, extra in records:
                if message.startswith(text) and fields.items() <= extra.items():
                    return extra
        raise AssertionError(f"no {text!r} record with {fields}; saw {[m for m, _ in records]}")

    assert "Circuit breaker state changed: closed -> open (dwcp)" in [m for m, _ in records]
    first("Circuit breaker state changed", state="open", previous="closed")
    assert "error" in first("Transport layer unhealthy", component="transport")
    assert "error" in first("Component health check failed", component="sync")
    assert "error" in first("Attempting component recovery", component="transport")
    assert first("Recovery attempt:", component="transport", attempt=1)["backoff"] == 0.001
    assert "error" in first("Recovery attempt failed", component="transport", attempt=1)
    first("Component recovered successfully", component="sync", attempt=1)
    failed = first("Component recovery failed after all attempts", component="transport")
    assert failed["attempt"] == 3 and "error" in failed


def test_a_hung_check_is_timed_as_the_check_timeout(make_manager: MakeManager) -> None:
    """docs/observability.md, "Prometheus": "A health check is timed from its start to its
    end, or counted as `health_check_timeout` when it hung past the timeout." """
    hang = threading.Event()
    layer = FakeLayer()
    layer.hang = hang
    manager = make_manager(FakeTransport(), compression=layer, health_check_timeout=0.2)
    try:
        manager.check_component_health()
        checks = manager.metrics().health_check_seconds["compression"]
        assert (checks.count, checks.sum) == (1, 0.2)
    finally:
        hang.set()
    # The hung check's own end, when it comes, is not timed a second time.
    wait_until(lambda: "dwcp-health-compression" not in [t.name for t in threading.enumerate()])
    checks = manager.metrics().health_check_seconds["compression"]
    assert (checks.count, checks.sum) == (1, 0.2)


def test_a_recovery_cycle_cancelled_by_stop_is_not_timed(make_manager: MakeManager) -> None:
    """docs/observability.md, "Prometheus": "A recovery cycle is timed on the manager's clock
    from its start to its success or give-up; a cycle cancelled by `stop()` is not
    counted." """
    transport = FakeTransport()
    clock = FakeClock()
    clock.block_on(4.0)
    manager = make_manager(transport, initial_backoff=1.0, clock=clock)
    manager.start()
    transport.healthy = False
    manager.check_component_health()
    assert clock.blocked.wait(PROMPT)  # inside the cycle's 4 s wait
    manager.stop()
    recovery = manager.metrics().recovery_seconds.get("transport")
    assert recovery is None or recovery.count == 0, recovery


def test_listeners_get_typed_immutable_events_on_their_own_thread(
    make_manager: MakeManager,
) -> None:
    """README.md, "Watching it": "`manager.add_listener(print)`  # typed, immutable events on
    their own thread"."""
    seen: list[tuple[dwcp.Event, str]] = []
    arrived = threading.Event()

    def listen(event: dwcp.Event) -> None:
        seen.append((event, threading.current_thread().name))
        arrived.set()

    transport = FakeTransport()
    manager = make_manager(transport, max_failures=1)
    manager.add_listener(listen)
    manager.start()
    transport.fail_sends = OSError("down")
    with pytest.raises(dwcp.TransportError):
        manager.send_with_circuit_breaker(b"x")  # opens the breaker: an event
    assert arrived.wait(PROMPT)
    event, thread = seen[0]
    assert isinstance(event, dwcp.BreakerStateChanged)
    assert (event.from_state, event.to_state) == ("closed", "open")
    assert thread == "dwcp-events" != threading.current_thread().name
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.to_state = "closed"  # type: ignore[misc]
