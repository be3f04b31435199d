"""The Manager's lifecycle has one owner: stop() during start() waits, then stops; nothing the
manager closed runs on after stop() returned, even when a recovery outlived stop()'s join."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

import dwcp
from dwcp.testing import FakeClock, FakeLayer, FakeTransport
from tests.conftest import wait_until

TIMEOUT = 30.0  # generous: only a hang reaches it


class GatedLayer(FakeLayer):
    """A layer whose start() blocks while ``gate`` is closed, once ``gating`` is set."""

    def __init__(self) -> None:
        super().__init__("gated")
        self.gate = threading.Event()
        self.gating = True
        self.entered = threading.Event()

    def start(self) -> None:
        if self.gating:
            self.entered.set()
            assert self.gate.wait(TIMEOUT), "the test never opened the gate"
        super().start()


def test_stop_during_start_waits_for_the_start_then_stops() -> None:
    layer = GatedLayer()
    manager = dwcp.Manager(FakeTransport(), compression=layer, health_interval=3600)
    starter = threading.Thread(target=manager.start, name="test-start")
    starter.start()
    assert layer.entered.wait(TIMEOUT)
    stopped = threading.Event()

    def stop() -> None:
        manager.stop()
        stopped.set()

    stopper = threading.Thread(target=stop, name="test-stop")
    stopper.start()
    # The stop cannot have finished: the start it must wait for is still blocked.
    assert not stopped.wait(0.05)
    layer.gate.set()
    starter.join(TIMEOUT)
    stopper.join(TIMEOUT)
    assert stopped.is_set()
    assert not manager.is_started
    assert not manager.monitor_alive
    assert layer.calls[-1] == "stop"  # started by start(), then stopped by stop()
    manager.stop()  # idempotent, never blocks
    manager.start()  # and the manager can start again
    manager.stop()


def test_stop_while_start_waits_on_a_slow_cluster_redis_stops_cleanly() -> None:
    redis = pytest.importorskip("redis")
    # A "Redis" that accepts the connection and does not answer: the member's first PING
    # blocks inside start() until the test lets it fail.
    silent = socket.create_server(("127.0.0.1", 0))
    client = redis.Redis(*silent.getsockname(), socket_timeout=TIMEOUT)
    manager = dwcp.Manager(FakeTransport(), cluster=client, health_interval=3600)
    errors: list[BaseException] = []

    def run(call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    starter = threading.Thread(target=run, args=(manager.start,), name="test-start")
    starter.start()
    conn, _ = silent.accept()  # the PING is on its way: start() is inside the member
    stopper = threading.Thread(target=run, args=(manager.stop,), name="test-stop")
    stopper.start()
    stopper.join(0.05)
    assert stopper.is_alive()  # it waits for the start still inside the member
    conn.close()  # the PING fails now, the member logs it and the start goes on
    silent.close()  # and every later Redis call is refused at once
    starter.join(TIMEOUT)
    stopper.join(TIMEOUT)
    assert errors == []  # no "cannot join thread before it is started"
    assert not manager.is_started
    manager.stop()  # a later stop returns at once
    client.close()


def test_a_recovery_start_that_outlives_stop_is_undone() -> None:
    layer = GatedLayer()
    layer.gating = False
    manager = dwcp.Manager(
        FakeTransport(),
        compression=layer,
        health_interval=3600,
        health_check_timeout=0.1,  # stop() joins recovery for 0.1 s + 1 s, then goes on
        clock=FakeClock(),
    )
    manager.start()
    layer.entered.clear()
    layer.gating = True
    layer.healthy = False
    recovering = threading.Thread(
        target=manager.attempt_component_recovery, args=("compression",), name="test-recovery"
    )
    recovering.start()
    assert layer.entered.wait(TIMEOUT)  # the recovery is inside the layer's start()
    manager.stop()  # gives up joining it: the start is hung
    assert layer.calls[-1] == "stop"
    layer.gate.set()  # the late start() returns after stop() did
    recovering.join(TIMEOUT)
    assert not recovering.is_alive()
    # What stop() closed stays closed: the late start was undone by a stop of its own.
    assert layer.calls[-2:] == ["start", "stop"]
    wait_until(lambda: not manager.monitor_alive, TIMEOUT)


def test_a_cluster_member_closed_during_its_first_ping_never_starts_its_thread() -> None:
    redis = pytest.importorskip("redis")
    from dwcp.cluster import ClusterMember

    silent = socket.create_server(("127.0.0.1", 0))
    client = redis.Redis(*silent.getsockname(), socket_timeout=TIMEOUT)
    member = ClusterMember(client, "n1", interval=1.0)
    starter = threading.Thread(target=member.start, name="test-member-start")
    starter.start()
    conn, _ = silent.accept()  # start() is at its first PING
    member.close()  # no "cannot join thread before it is started"
    conn.close()
    silent.close()
    starter.join(TIMEOUT)
    assert not starter.is_alive()
    assert not any(t.name == "dwcp-cluster" for t in threading.enumerate())
    client.close()


@pytest.mark.parametrize(
    "cls",
    [
        dwcp.Manager,
        dwcp.MultiStreamReceiver,
        dwcp.MultiStreamTCPTransport,
        dwcp.HealthServer,
        dwcp.WebhookNotifier,
        pytest.param("cluster", id="ClusterMember"),
    ],
)
def test_every_class_that_starts_stops_with_both_stop_and_close(cls: object) -> None:
    if cls == "cluster":
        from dwcp.cluster import ClusterMember

        cls = ClusterMember
    assert callable(getattr(cls, "start", None))
    assert callable(getattr(cls, "stop", None)) and callable(getattr(cls, "close", None))


def test_stop_from_a_listener_ends_the_manager_idle_and_restartable() -> None:
    layer = FakeLayer()
    manager = dwcp.Manager(FakeTransport(), compression=layer, health_interval=3600)
    stopped_inside: list[BaseException | None] = []

    def listener(event: dwcp.Event) -> None:
        if isinstance(event, dwcp.ComponentUnhealthy) and not stopped_inside:
            try:
                manager.stop()  # on dwcp-events, one of the manager's own threads
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                stopped_inside.append(exc)
            else:
                stopped_inside.append(None)

    manager.add_listener(listener)
    manager.start()
    layer.healthy = False
    manager.check_component_health()
    wait_until(lambda: stopped_inside, TIMEOUT)
    assert stopped_inside == [None]  # no "cannot join current thread"
    assert not manager.is_started
    wait_until(lambda: not any(t.name.startswith("dwcp-") for t in threading.enumerate()))
    manager.start()  # not wedged in "stopping"
    manager.stop()


def test_stop_from_a_component_start_during_recovery_ends_the_manager_idle() -> None:
    class StopsTheManager(FakeLayer):
        manager: dwcp.Manager

        def start(self) -> None:
            super().start()
            if self.calls.count("start") == 2:  # the restart by recovery
                self.manager.stop()  # on dwcp-recovery-compression

    layer = StopsTheManager()
    manager = dwcp.Manager(
        FakeTransport(), compression=layer, health_interval=3600, clock=FakeClock()
    )
    layer.manager = manager
    manager.start()
    layer.healthy = False
    manager.check_component_health()
    wait_until(lambda: not manager.is_started, TIMEOUT)
    wait_until(lambda: not any(t.name.startswith("dwcp-") for t in threading.enumerate()))
    manager.start()
    manager.stop()


def test_a_restart_waits_for_a_recovery_that_outlived_stop_so_cycles_never_overlap() -> None:
    class Counting(GatedLayer):
        def __init__(self) -> None:
            super().__init__()
            self.inside = 0
            self.most_inside = 0

        def start(self) -> None:
            with self._lock:
                self.inside += 1
                self.most_inside = max(self.most_inside, self.inside)
            try:
                super().start()
            finally:
                with self._lock:
                    self.inside -= 1

    layer = Counting()
    layer.gating = False
    manager = dwcp.Manager(
        FakeTransport(),
        compression=layer,
        health_interval=3600,
        health_check_timeout=1.0,  # stop() joins recovery for 2 s, then goes on
        clock=FakeClock(),
    )
    manager.start()
    layer.entered.clear()
    layer.gating = True
    layer.healthy = False
    manager.check_component_health()
    assert layer.entered.wait(TIMEOUT)  # the recovery is inside the layer's start()
    manager.stop()  # gives up joining it
    layer.gating = False
    restarted = threading.Thread(target=manager.start, name="test-restart")
    restarted.start()
    restarted.join(0.05)
    assert restarted.is_alive()  # it waits for the old run's recovery
    layer.gate.set()
    restarted.join(TIMEOUT)
    assert manager.is_started
    assert layer.most_inside == 1  # never two start() calls at once
    assert layer.calls[-3:] == ["start", "stop", "start"]  # late start undone, then the new
    manager.stop()


def test_a_restart_while_a_recovery_still_hangs_in_a_component_raises_still_stopping() -> None:
    """README.md, "Quick start", the error table: "`DWCPError` | `STILL_STOPPING` |
    `Manager.start()` while a recovery of the previous run is still inside a component call
    that outlived `stop()`'s join (waited for up to `health_check_timeout + 1 s` first)"."""
    layer = GatedLayer()
    layer.gating = False
    manager = dwcp.Manager(
        FakeTransport(),
        compression=layer,
        health_interval=3600,
        health_check_timeout=0.2,  # joins give up after 1.2 s
        clock=FakeClock(),
    )
    manager.start()
    layer.entered.clear()
    layer.gating = True
    layer.healthy = False
    manager.check_component_health()
    assert layer.entered.wait(TIMEOUT)  # the recovery is inside the layer's start()
    try:
        manager.stop()  # gives up joining it
        began = time.monotonic()
        with pytest.raises(dwcp.DWCPError) as raised:
            manager.start()
        assert time.monotonic() - began >= 1.0  # it waited for the recovery first
        assert raised.value.code == "STILL_STOPPING"
        assert not manager.is_started and not manager.monitor_alive
    finally:
        layer.gating = False
        layer.gate.set()
    manager.start()  # once the component call returned, the manager starts again
    assert manager.is_started
    manager.stop()
