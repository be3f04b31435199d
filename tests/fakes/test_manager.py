"""Manager lifecycle, configuration and the breaker as seen through the public API."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from freezegun import freeze_time

import dwcp
from dwcp.testing import FakeLayer, FakeTransport
from tests.conftest import wait_until

MakeManager = Callable[..., dwcp.Manager]


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("health_interval", 0),
        ("health_interval", -1.0),
        ("health_interval", math.nan),
        ("health_check_timeout", 0),
        ("health_check_timeout", math.inf),
        ("initial_backoff", -0.5),
        ("max_retries", 0),
        ("max_failures", 0),
        ("reset_timeout", 0),
        ("reset_timeout", -30.0),
    ],
)
def test_invalid_values_raise_value_error_naming_the_parameter(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        dwcp.Manager(FakeTransport(), **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "value"),
    [("health_interval", "10"), ("max_retries", 2.5), ("max_failures", True)],
)
def test_wrong_types_raise_type_error_naming_the_parameter(name: str, value: object) -> None:
    with pytest.raises(TypeError, match=name):
        dwcp.Manager(FakeTransport(), **{name: value})  # type: ignore[arg-type]


def test_zero_backoff_is_allowed() -> None:
    dwcp.Manager(FakeTransport(), initial_backoff=0)


def test_component_missing_methods_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="transport .* health_check"):
        dwcp.Manager(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="compression .* is_healthy"):
        dwcp.Manager(compression=object())  # type: ignore[arg-type]


# -- lifecycle -------------------------------------------------------------------------------


def test_start_runs_components_in_order_and_stop_reverses_it(make_manager: MakeManager) -> None:
    order: list[str] = []

    class Recording(FakeLayer):
        def start(self) -> None:
            order.append(f"start {self.name}")

        def stop(self) -> None:
            order.append(f"stop {self.name}")

    class RecordingTransport(FakeTransport):
        def start(self) -> None:
            order.append("start transport")

        def close(self) -> None:
            order.append("close transport")

    layers = {slot: Recording(slot) for slot in ("compression", "prediction", "sync", "consensus")}
    manager = make_manager(RecordingTransport(), **layers)
    manager.start()
    assert manager.is_started
    manager.stop()
    assert not manager.is_started
    assert order == [
        "start transport",
        "start compression",
        "start prediction",
        "start sync",
        "start consensus",
        "stop consensus",
        "stop sync",
        "stop prediction",
        "stop compression",
        "close transport",
    ]


def test_starting_twice_raises_already_started(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport())
    manager.start()
    with pytest.raises(dwcp.DWCPError) as info:
        manager.start()
    assert info.value.code == "ALREADY_STARTED"


def test_disabled_manager_does_nothing_on_start(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    manager = make_manager(transport, enabled=False)
    manager.start()
    assert not manager.is_started
    assert transport.started == 0
    assert not [t for t in threading.enumerate() if t.name == "dwcp-monitor"]
    with pytest.raises(dwcp.DWCPError) as info:
        manager.send_with_circuit_breaker(b"x")
    assert info.value.code == "NOT_STARTED"


def test_context_manager_starts_and_stops(transport: FakeTransport) -> None:
    with dwcp.Manager(transport) as manager:
        assert manager.is_started
    assert not manager.is_started
    assert transport.closed == 1


def test_stop_is_idempotent_and_safe_before_start(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport())
    manager.stop()
    manager.start()
    stoppers = [threading.Thread(target=manager.stop) for _ in range(4)]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join(5)
    assert not manager.is_started
    manager.stop()


def test_fail_fast_start_leaves_nothing_running(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    transport.start_error = ConnectionRefusedError(111, "Connection refused")
    layer = FakeLayer()
    manager = make_manager(transport, compression=layer, fail_fast=True)
    with pytest.raises(dwcp.TransportError) as info:
        manager.start()
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert not manager.is_started and layer.calls == []
    transport.start_error = None
    manager.start()
    assert manager.is_started


def test_fail_fast_layer_that_fails_to_start_stops_the_ones_already_started(
    make_manager: MakeManager,
) -> None:
    class Broken(FakeLayer):
        def start(self) -> None:
            raise RuntimeError("no such codec")

    transport, compression = FakeTransport(), FakeLayer()
    manager = make_manager(transport, compression=compression, sync=Broken(), fail_fast=True)
    with pytest.raises(dwcp.DWCPError, match="sync failed to start") as info:
        manager.start()
    assert info.value.code == "START_FAILED"
    assert compression.calls == ["start", "stop"] and transport.closed == 1


def test_a_peer_down_at_start_starts_degraded_and_is_recovered(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    transport.start_error = ConnectionRefusedError(111, "Connection refused")
    events: list[object] = []
    manager = make_manager(transport, initial_backoff=0.05, max_retries=50)
    manager.add_listener(events.append)
    with manager:  # does not raise: keeping the link alive is the manager's job
        assert manager.is_started
        assert manager.health().components["transport"].status == "recovering"
        wait_until(lambda: any(isinstance(e, dwcp.ComponentUnhealthy) for e in events))
        unhealthy = next(e for e in events if isinstance(e, dwcp.ComponentUnhealthy))
        assert unhealthy.component == "transport"
        assert "failed to start" in unhealthy.error
        transport.start_error = None  # the peer comes back
        wait_until(lambda: manager.health().components["transport"].status == "healthy")
        assert transport.calls[:3] == ["start", "close", "start"]
        manager.send_with_circuit_breaker(b"after")
        assert transport.sent == [b"after"]


def test_a_layer_that_fails_to_start_is_recovered_while_the_rest_runs(
    make_manager: MakeManager,
) -> None:
    class FlakyStart(FakeLayer):
        def __init__(self) -> None:
            super().__init__()
            self.fail = True

        def start(self) -> None:
            super().start()
            if self.fail:
                raise RuntimeError("codec not loaded yet")

    transport, sync = FakeTransport(), FlakyStart()
    manager = make_manager(transport, sync=sync, initial_backoff=0.05, max_retries=50)
    manager.start()
    assert manager.health().components["sync"].status == "recovering"
    manager.send_with_circuit_breaker(b"works meanwhile")
    sync.fail = False
    wait_until(lambda: manager.health().components["sync"].status == "healthy")
    manager.stop()
    assert transport.sent == [b"works meanwhile"]


def test_fail_fast_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="fail_fast"):
        dwcp.Manager(FakeTransport(), fail_fast="yes")  # type: ignore[arg-type]


def test_hundred_start_stop_cycles_leave_no_threads(make_manager: MakeManager) -> None:
    baseline = threading.active_count()
    manager = make_manager(FakeTransport(), compression=FakeLayer(), health_interval=0.001)
    for _ in range(100):
        manager.start()
        manager.send_with_circuit_breaker(b"ping")
        manager.stop()
    wait_until(lambda: threading.active_count() == baseline)


# -- the send path ---------------------------------------------------------------------------


def test_fifth_failure_raises_its_own_error_sixth_is_rejected(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    manager = make_manager(transport)
    manager.start()
    transport.fail_sends = ConnectionResetError(104, "Connection reset by peer")
    for _ in range(5):
        with pytest.raises(dwcp.TransportError) as info:
            manager.send_with_circuit_breaker(b"x")
        assert isinstance(info.value.__cause__, ConnectionResetError)
    assert manager.circuit_breaker_state == "open"
    assert transport.send_calls == 5
    transport.fail_sends = None
    with pytest.raises(dwcp.CircuitOpenError) as rejected:
        manager.send_with_circuit_breaker(b"x")
    assert rejected.value.code == "CIRCUIT_OPEN"
    assert transport.send_calls == 5 and transport.sent == []
    metrics = manager.metrics()
    assert metrics.send_errors == 5 and metrics.breaker_rejections == 1


@pytest.mark.parametrize("code", ["NOT_STARTED", "BACKPRESSURE", "WINDOW_FULL"])
def test_send_errors_count_every_failed_send_also_those_the_breaker_does_not(
    make_manager: MakeManager, code: str
) -> None:
    """docs/observability.md: ``dwcp_send_errors_total`` counts every admitted send that
    failed, those that do not count against the breaker too."""
    transport = FakeTransport()
    manager = make_manager(transport, max_failures=1)
    manager.start()
    transport.fail_sends = dwcp.TransportError("not now", code=code)
    for _ in range(3):
        with pytest.raises(dwcp.TransportError):
            manager.send_with_circuit_breaker(b"x")
    assert manager.circuit_breaker_state == "closed"
    assert (manager.metrics().send_errors, manager.metrics().sends) == (3, 0)


def test_caller_errors_and_interrupts_never_count(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    manager = make_manager(transport, max_failures=1)
    with pytest.raises(dwcp.DWCPError) as not_started:
        manager.send_with_circuit_breaker(b"x")
    assert not_started.value.code == "NOT_STARTED"
    manager.start()
    for bad in ("text", 42, None, [1, 2]):
        with pytest.raises(TypeError, match="bytes-like"):
            manager.send_with_circuit_breaker(bad)  # type: ignore[arg-type]
    transport.fail_sends = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        manager.send_with_circuit_breaker(b"x")
    transport.fail_sends = ValueError("message larger than max_message_size")
    with pytest.raises(ValueError):
        manager.send_with_circuit_breaker(b"x")
    assert manager.circuit_breaker_state == "closed"
    transport.fail_sends = None
    manager.send_with_circuit_breaker(bytearray(b"ab"))
    manager.send_with_circuit_breaker(memoryview(b"cde"))
    assert transport.sent == [b"ab", b"cde"]
    assert manager.metrics().sent_bytes == 5


def test_missing_transport_is_reported_and_never_counts(make_manager: MakeManager) -> None:
    manager = make_manager(None, compression=FakeLayer(), max_failures=1)
    manager.start()
    for _ in range(3):
        with pytest.raises(dwcp.DWCPError) as info:
            manager.send_with_circuit_breaker(b"x")
        assert info.value.code == "NO_TRANSPORT"
    assert manager.circuit_breaker_state == "closed"  # max_failures=1, and nothing counted


def test_half_open_read_before_any_call_then_trial_closes(make_manager: MakeManager) -> None:
    with freeze_time("2026-01-01 00:00:00") as clock:
        transport = FakeTransport()
        manager = make_manager(transport)
        manager.start()
        transport.fail_sends = OSError("down")
        for _ in range(5):
            with pytest.raises(dwcp.TransportError):
                manager.send_with_circuit_breaker(b"x")
        clock.tick(timedelta(seconds=29))
        assert manager.circuit_breaker_state == "open"
        clock.tick(timedelta(seconds=1))
        assert manager.circuit_breaker_state == "half-open"
        transport.fail_sends = None
        manager.send_with_circuit_breaker(b"trial")
        assert manager.circuit_breaker_state == "closed"


def test_half_open_admits_one_trial_while_it_is_in_flight(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    manager = make_manager(transport, max_failures=1)
    manager.start()
    transport.fail_sends = OSError("down")
    with pytest.raises(dwcp.TransportError):
        manager.send_with_circuit_breaker(b"x")
    transport.fail_sends = None
    assert manager.attempt_component_recovery("transport")  # a verified recovery half-opens
    assert manager.circuit_breaker_state == "half-open"
    gate = transport.send_gate = threading.Event()
    trial = threading.Thread(target=manager.send_with_circuit_breaker, args=(b"trial",))
    trial.start()
    wait_until(lambda: transport.send_calls == 2)
    for _ in range(3):
        with pytest.raises(dwcp.CircuitOpenError):
            manager.send_with_circuit_breaker(b"other")
    gate.set()
    trial.join(5)
    assert manager.circuit_breaker_state == "closed"
    assert transport.sent == [b"trial"]


def test_senders_are_not_serialised(make_manager: MakeManager) -> None:
    """Four sends that each wait for the other three can only finish if they run together."""
    barrier = threading.Barrier(4)

    class Rendezvous(FakeTransport):
        def send(self, data: bytes | bytearray | memoryview) -> None:
            barrier.wait(5)  # BrokenBarrierError (an error, not a hang) if sends were serialised
            super().send(data)

    transport = Rendezvous()
    manager = make_manager(transport)
    manager.start()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            manager.send_with_circuit_breaker(b"x")
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == [] and len(transport.sent) == 4


def test_hung_send_blocks_nobody(make_manager: MakeManager) -> None:
    hang = threading.Event()
    entered = threading.Event()

    class Sticky(FakeTransport):
        def send(self, data: bytes | bytearray | memoryview) -> None:
            if data == b"hang":
                entered.set()
                hang.wait(30)
                return
            super().send(data)

    transport = Sticky()
    manager = make_manager(transport)
    manager.start()
    stuck = threading.Thread(target=manager.send_with_circuit_breaker, args=(b"hang",))
    stuck.start()
    try:
        assert entered.wait(5)
        for _ in range(10):
            manager.send_with_circuit_breaker(b"ok")
        assert manager.circuit_breaker_state == "closed"
        assert manager.health().healthy
        stopper = threading.Thread(target=manager.stop)
        stopper.start()
        stopper.join(5)
        assert not stopper.is_alive()
        assert len(transport.sent) == 10
    finally:
        hang.set()
        stuck.join(5)


def test_eight_thread_load_exact_counts(make_manager: MakeManager) -> None:
    """Every call is accounted exactly once: a transport error or a rejection, never both."""
    transport = FakeTransport()
    manager = make_manager(transport, max_failures=5)
    manager.start()
    transport.fail_sends = ConnectionResetError("reset")
    attempts_per_thread = 250
    counts = {"transport_error": 0, "rejected": 0}
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait(5)
        for _ in range(attempts_per_thread):
            try:
                manager.send_with_circuit_breaker(b"x")
            except dwcp.CircuitOpenError:
                kind = "rejected"
            except dwcp.TransportError:
                kind = "transport_error"
            with lock:
                counts[kind] += 1

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    metrics = manager.metrics()
    assert counts["transport_error"] + counts["rejected"] == 8 * attempts_per_thread
    assert metrics.send_errors == counts["transport_error"]
    assert metrics.breaker_rejections == counts["rejected"]
    # The breaker opened once, on the 5th counted failure; in-flight calls admitted before it
    # opened may still fail (at most one per other thread) but cannot re-trip it.
    assert metrics.breaker_state_changes == 1
    assert 5 <= counts["transport_error"] <= 5 + 7
    assert manager.circuit_breaker_state == "open"


def test_extra_named_layers_are_checked_and_recovered(make_manager: MakeManager) -> None:
    extra = FakeLayer("cache")
    extra.heal_on_restart = True
    manager = make_manager(FakeTransport(), compression=FakeLayer(), layers={"cache": extra})
    manager.start()
    assert list(manager.health().components) == ["transport", "compression", "cache"]
    extra.healthy = False
    assert manager.attempt_component_recovery("cache")
    assert extra.calls == ["start", "stop", "start"]


@pytest.mark.parametrize(
    ("layers", "error", "match"),
    [
        ({"sync": FakeLayer()}, ValueError, "clashes"),
        ({"": FakeLayer()}, ValueError, "non-empty"),
        ({"cache": object()}, TypeError, "layer 'cache'"),
    ],
)
def test_extra_layers_are_validated(layers: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        dwcp.Manager(FakeTransport(), layers=layers)  # type: ignore[arg-type]


def test_a_transport_left_closed_by_recovery_does_not_count(make_manager: MakeManager) -> None:
    """A "not started" never counts (the spec), not even from a transport that recovery has
    closed and not restarted yet: this process not having reconnected says nothing about the
    peer. The sends still fail, typed, and are counted as send errors."""
    transport = FakeTransport()
    manager = make_manager(transport, max_failures=2)
    manager.start()
    transport.fail_sends = dwcp.TransportError("transport is not started", code="NOT_STARTED")
    for _ in range(5):
        with pytest.raises(dwcp.TransportError) as info:
            manager.send_with_circuit_breaker(b"x")
        assert info.value.code == "NOT_STARTED"
    assert manager.circuit_breaker_state == "closed"
    assert manager.metrics().send_errors == 5


@pytest.mark.parametrize("code", ["BACKPRESSURE", "WINDOW_FULL"])
def test_a_slow_peer_slows_senders_and_never_opens_the_breaker(
    make_manager: MakeManager, code: str
) -> None:
    """Backpressure is not a fault: a send that found no room in time fails alone, typed, and
    the breaker, which guards against a peer that is down, does not count it."""
    transport = FakeTransport()
    manager = make_manager(transport, max_failures=2)
    manager.start()
    transport.fail_sends = dwcp.TransportError("no room within send_timeout", code=code)
    for _ in range(5):
        with pytest.raises(dwcp.TransportError) as info:
            manager.send_with_circuit_breaker(b"x")
        assert info.value.code == code
    assert manager.circuit_breaker_state == "closed"
    transport.fail_sends = None
    manager.send_with_circuit_breaker(b"room again")
    assert transport.sent[-1] == b"room again"


def test_send_counters_are_exact_across_threads(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport())
    manager.start()
    barrier = threading.Barrier(8)

    def worker(size: int) -> None:
        barrier.wait(5)
        for _ in range(500):
            manager.send_with_circuit_breaker(b"x" * size)

    threads = [threading.Thread(target=worker, args=(i + 1,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    metrics = manager.metrics()
    assert metrics.sends == 8 * 500
    assert metrics.sent_bytes == 500 * sum(range(1, 9))


def test_stop_waits_one_deadline_for_all_hung_recoveries(make_manager: MakeManager) -> None:
    gate = threading.Event()

    class HangsOnRestart(FakeLayer):
        def start(self) -> None:
            super().start()
            if "stop" in self.calls:  # a restart by recovery, not the first start
                gate.wait(60)

    layers = {f"layer{i}": HangsOnRestart(f"layer{i}") for i in range(3)}
    manager = make_manager(
        FakeTransport(), layers=layers, health_interval=0.02, health_check_timeout=2.0
    )
    manager.start()
    for layer in layers.values():
        layer.healthy = False
    wait_until(lambda: all(layer.calls.count("start") == 2 for layer in layers.values()))
    began = time.monotonic()
    try:
        manager.stop()
        elapsed = time.monotonic() - began
    finally:
        gate.set()
    # One deadline (health_check_timeout + 1 s = 3 s) for the three hung cycles, not one
    # each (9 s); the margin is for a busy machine.
    assert elapsed < 2.0 + 1.0 + 3.0, elapsed
