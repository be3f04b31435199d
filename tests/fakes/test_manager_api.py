"""The Manager's public surface: guarded calls, validation that names the argument, reprs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest

import dwcp
from dwcp.testing import FakeClock, FakeLayer, FakeTransport
from tests.conftest import wait_until

MakeManager = Callable[..., dwcp.Manager]


def test_call_counts_peer_failures_and_opens_the_breaker(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport(), max_failures=2)
    manager.start()

    def fetch() -> bytes:
        raise ConnectionRefusedError("peer down")

    for _ in range(2):
        with pytest.raises(ConnectionRefusedError):  # the caller's own exception, unchanged
            manager.call(fetch)
    assert manager.circuit_breaker_state == "open"
    with pytest.raises(dwcp.CircuitOpenError):
        manager.call(fetch)
    metrics = manager.metrics()
    assert (metrics.call_errors, metrics.call_rejections, metrics.send_errors) == (2, 1, 0)


def test_call_does_not_count_caller_errors(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport(), max_failures=1)
    manager.start()
    for _ in range(3):
        with pytest.raises(KeyError):
            manager.call({}.__getitem__, "missing")
    assert manager.circuit_breaker_state == "closed"
    assert manager.call(divmod, 7, 2) == (3, 1)


def test_guard_decorates_with_the_same_breaker(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    manager = make_manager(transport, max_failures=1)
    manager.start()
    calls: list[int] = []

    @manager.guard
    def query(n: int) -> int:
        calls.append(n)
        if n < 0:
            raise TimeoutError("slow peer")
        return n * 2

    assert query(21) == 42
    assert query.__name__ == "query"
    with pytest.raises(TimeoutError):
        query(-1)
    # One breaker for sends and guarded calls: the send is rejected too.
    with pytest.raises(dwcp.CircuitOpenError):
        manager.send_with_circuit_breaker(b"x")
    assert calls == [21, -1] and transport.sent == []


def test_call_before_start_is_not_started(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport())
    with pytest.raises(dwcp.DWCPError) as info:
        manager.call(int)
    assert info.value.code == "NOT_STARTED"
    with pytest.raises(TypeError, match="fn must be callable"):
        manager.call("not callable")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"health_port": -1}, ValueError, "health_port"),
        ({"health_port": 70000}, ValueError, "health_port"),
        ({"health_port": "80"}, TypeError, "health_port"),
        ({"health_port": 0, "health_host": 1234}, TypeError, "health_host"),
        # Checked without a health_port too, as HealthServer checks its host.
        ({"health_host": 5}, TypeError, "^health_host must be a string"),
        ({"health_host": ""}, ValueError, "^health_host must be a non-empty string"),
        ({"enabled": "no"}, TypeError, "enabled"),
        ({"fail_fast": 1}, TypeError, "fail_fast"),
        ({"layers": [FakeLayer()]}, TypeError, "layers must be a mapping"),
        ({"recovery": [1]}, TypeError, "recovery must be a mapping"),
        ({"health_interval": "10"}, TypeError, "health_interval"),
        ({"health_interval": 0}, ValueError, "health_interval"),
        ({"reset_timeout": float("inf")}, ValueError, "reset_timeout"),
        ({"max_retries": 0}, ValueError, "max_retries"),
        ({"max_failures": True}, TypeError, "max_failures"),
        ({"breaker_name": ""}, ValueError, "breaker_name"),
        ({"clock": object()}, TypeError, "clock"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict[str, object], error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        dwcp.Manager(FakeTransport(), **kwargs)  # type: ignore[arg-type]


def test_seconds_accept_timedelta_everywhere() -> None:
    clock = FakeClock()
    manager = dwcp.Manager(
        FakeTransport(),
        health_interval=timedelta(seconds=3600),
        health_check_timeout=timedelta(milliseconds=500),
        initial_backoff=timedelta(seconds=2),
        reset_timeout=timedelta(minutes=1),
        clock=clock,
    )
    manager.start()
    try:
        manager.attempt_component_recovery("transport", ConnectionError("seen by the app"))
    finally:
        manager.stop()
    assert clock.slept == [2.0]  # the first attempt waits initial_backoff, and succeeds


def test_a_transport_without_the_methods_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="transport str lacks the method"):
        dwcp.Manager("not a transport")  # type: ignore[arg-type]


def test_reprs_say_what_they_are(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport(), breaker_name="orders")
    assert repr(manager) == "<Manager 'orders' idle components=['transport'] breaker=closed>"
    assert manager.name == "orders"
    manager.start()
    assert "started" in repr(manager)
    assert repr(FakeClock(5)) == "<FakeClock now=5>"


def test_fake_clock_block_on_waits_for_the_interrupt() -> None:
    clock = FakeClock()
    clock.block_on(4.0)
    interrupt = threading.Event()
    assert clock.sleep(1.0, interrupt) is True and clock.now() == 1.0
    result: list[bool] = []
    sleeper = threading.Thread(target=lambda: result.append(clock.sleep(4.0, interrupt)))
    sleeper.start()
    assert clock.blocked.wait(5)
    interrupt.set()
    sleeper.join(5)
    assert result == [False] and clock.now() == 1.0 and clock.slept == [1.0, 4.0]


def test_metrics_time_sends_checks_and_recovery_cycles(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    clock = FakeClock()
    manager = make_manager(transport, initial_backoff=1.0, clock=clock)
    manager.start()
    for _ in range(64):
        manager.send_with_circuit_breaker(b"x")
    transport.fail_sends = ConnectionError("down")
    with pytest.raises(dwcp.TransportError):
        manager.send_with_circuit_breaker(b"x")
    manager.check_component_health()
    transport.healthy = False
    assert not manager.attempt_component_recovery("transport")  # 1 + 2 + 4 s on the clock
    metrics = manager.metrics()
    # Timed: a send made when its thread's success count is a multiple of 64, successful or
    # not: the 1st and the failure after the 64th.
    assert metrics.sends == 64 and metrics.send_seconds.count == 2
    assert metrics.send_seconds.cumulative_counts[-1] <= 2
    checks = metrics.health_check_seconds["transport"]
    assert checks.count == 1 + 3  # the pass, then one re-check per attempt
    assert metrics.recovery_seconds["transport"].count == 1
    assert metrics.recovery_seconds["transport"].sum == 7.0


def test_events_name_their_manager_and_peer(make_manager: MakeManager) -> None:
    class Addressed(FakeTransport):
        address = ("127.0.0.1", 7400)

    seen: list[dwcp.Event] = []
    manager = make_manager(Addressed(), breaker_name="orders", max_failures=1)
    manager.add_listener(seen.append)
    manager.start()
    transport_down = ConnectionError("down")

    def fail() -> None:
        raise transport_down

    with pytest.raises(ConnectionError):
        manager.call(fail)  # opens the breaker: max_failures=1
    wait_until(lambda: any(isinstance(e, dwcp.BreakerStateChanged) for e in seen))
    change = next(e for e in seen if isinstance(e, dwcp.BreakerStateChanged))
    assert (change.manager, change.peer) == ("orders", "127.0.0.1:7400")


def test_failed_sends_raise_the_transports_suspicion(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    clock = FakeClock()
    manager = make_manager(transport, clock=clock, max_failures=100)
    manager.start()
    for _ in range(256):  # sampled successes: sends answer in microseconds
        manager.send_with_circuit_breaker(b"x")
    assert manager.health().components["transport"].suspicion < 1.0
    transport.fail_sends = ConnectionError("peer stopped answering")
    with pytest.raises(dwcp.TransportError):
        manager.send_with_circuit_breaker(b"x")
    clock.advance(5.0)  # no answer for 5 s of the manager's clock, against a 1 s check timeout
    assert manager.health().components["transport"].suspicion > 8.0
    assert manager.health().components["transport"].status == "healthy"  # suspected, not failed


def test_a_rejected_send_is_not_timed(make_manager: MakeManager) -> None:
    """docs/observability.md, "Prometheus": "a `send_with_circuit_breaker` call that reaches
    the transport is timed when its thread's count of successful sends is a multiple of
    64 [...] A rejected send is not timed." """
    transport = FakeTransport()
    manager = make_manager(transport, max_failures=1, reset_timeout=3600)
    manager.start()
    transport.fail_sends = ConnectionError("down")
    with pytest.raises(dwcp.TransportError):
        manager.send_with_circuit_breaker(b"x")  # no success yet: sampled, and opens
    assert manager.metrics().send_seconds.count == 1
    for _ in range(5):  # the success count is still 0, a multiple of 64: only rejection spares them
        with pytest.raises(dwcp.CircuitOpenError):
            manager.send_with_circuit_breaker(b"x")
    metrics = manager.metrics()
    assert metrics.breaker_rejections == 5
    assert metrics.send_seconds.count == 1


def test_cluster_health_without_a_cluster_raises_no_cluster(make_manager: MakeManager) -> None:
    """README.md, "Quick start", the error table: "`DWCPError` | `NO_CLUSTER` |
    `Manager.cluster_health()` on a manager without `cluster`"."""
    manager = make_manager(FakeTransport())
    manager.start()
    with pytest.raises(dwcp.DWCPError) as raised:
        manager.cluster_health()
    assert raised.value.code == "NO_CLUSTER"
    assert str(raised.value).startswith("[NO_CLUSTER] ")
