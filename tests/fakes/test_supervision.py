"""Restart intensity and adaptive backoff: pure rules with explicit times, then via the Manager."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

import dwcp
from dwcp._recovery import RecoveryPolicy, RestartSupervisor
from dwcp.testing import FakeClock, FakeLayer, FakeTransport
from tests.conftest import wait_until

MakeManager = Callable[..., dwcp.Manager]


def test_default_policy_never_escalates_or_adapts() -> None:
    supervisor = RestartSupervisor(RecoveryPolicy())
    for now in range(100):
        assert supervisor.admit(float(now)) == "run"
        assert supervisor.cycle_policy() == RecoveryPolicy()
        supervisor.recovered(now + 0.5)


def test_more_than_max_cycles_in_the_window_escalates_until_reset() -> None:
    supervisor = RestartSupervisor(RecoveryPolicy(max_cycles=3, cycle_window=10.0))
    assert [supervisor.admit(t) for t in (0.0, 1.0, 2.0)] == ["run"] * 3
    assert supervisor.admit(3.0) == "escalate"
    assert supervisor.escalated
    assert supervisor.admit(100.0) == "blocked"  # no cool-down: blocked for good
    supervisor.reset()
    assert supervisor.admit(101.0) == "run"


def test_cycles_outside_the_window_do_not_count() -> None:
    supervisor = RestartSupervisor(RecoveryPolicy(max_cycles=2, cycle_window=10.0))
    assert supervisor.admit(0.0) == "run"
    assert supervisor.admit(5.0) == "run"
    assert supervisor.admit(10.0) == "run"  # the one at 0.0 left the window
    assert supervisor.admit(11.0) == "escalate"


def test_cooldown_lifts_the_escalation() -> None:
    supervisor = RestartSupervisor(RecoveryPolicy(max_cycles=1, cycle_window=60.0, cooldown=30.0))
    assert supervisor.admit(0.0) == "run"
    assert supervisor.admit(1.0) == "escalate"
    assert supervisor.admit(30.0) == "blocked"
    assert supervisor.admit(31.0) == "run"


def test_stable_period_clears_the_cycle_count() -> None:
    policy = RecoveryPolicy(max_cycles=2, cycle_window=1000.0, stable_period=50.0)
    supervisor = RestartSupervisor(policy)
    supervisor.admit(0.0)
    supervisor.recovered(1.0)
    supervisor.admit(10.0)
    supervisor.recovered(11.0)
    assert supervisor.admit(61.0) == "run"  # healthy for 50 s since 11.0: history cleared
    assert supervisor.admit(62.0) == "run"
    assert supervisor.admit(63.0) == "escalate"


def test_adaptive_backoff_grows_while_flapping_and_resets_when_stable() -> None:
    policy = RecoveryPolicy(adaptive_backoff=True, stable_period=30.0, max_backoff=5.0)
    supervisor = RestartSupervisor(policy)
    first_waits = []
    now = 0.0
    for _ in range(5):  # fails again 1 s after each recovery
        supervisor.admit(now)
        first_waits.append(supervisor.cycle_policy().initial_backoff)
        supervisor.recovered(now + 1.0)
        now += 2.0
    assert first_waits == [1.0, 2.0, 4.0, 5.0, 5.0]  # doubled each time, capped
    supervisor.admit(now + 30.0)  # stayed healthy for the stable period
    assert supervisor.cycle_policy().initial_backoff == 1.0


def test_adaptive_backoff_unbounded_policy_caps_at_sixty_seconds() -> None:
    supervisor = RestartSupervisor(RecoveryPolicy(adaptive_backoff=True, stable_period=30.0))
    for i in range(10):
        supervisor.admit(float(i))
        supervisor.recovered(i + 0.5)
    assert supervisor.cycle_policy().initial_backoff == 60.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_cycles": 0}, "max_cycles"),
        ({"cycle_window": 0}, "cycle_window"),
        ({"cooldown": -1}, "cooldown"),
        ({"stable_period": 0}, "stable_period"),
    ],
)
def test_supervision_fields_are_validated(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RecoveryPolicy(**kwargs)  # type: ignore[arg-type]


# -- through the Manager ---------------------------------------------------------------------


def test_recovery_mapping_overrides_one_component(make_manager: MakeManager) -> None:
    layer = FakeLayer()
    layer.healthy = False
    manager = make_manager(
        FakeTransport(),
        compression=layer,
        recovery={"compression": RecoveryPolicy(attempts=5, initial_backoff=0.0)},
    )
    manager.start()
    assert not manager.attempt_component_recovery("compression")
    assert layer.calls.count("stop") == 5
    assert manager.metrics().recovery_attempts == 5


def test_recovery_mapping_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown component 'sync'"):
        dwcp.Manager(FakeTransport(), recovery={"sync": RecoveryPolicy()})
    with pytest.raises(TypeError, match="RecoveryPolicy"):
        dwcp.Manager(FakeTransport(), recovery={"transport": {"attempts": 3}})  # type: ignore[dict-item]


def test_escalation_stops_cycles_until_reset(make_manager: MakeManager) -> None:
    layer = FakeLayer()
    layer.healthy = False
    escalated = threading.Event()
    seen: list[dwcp.Event] = []

    def listen(event: dwcp.Event) -> None:
        seen.append(event)
        if isinstance(event, dwcp.ComponentEscalated):
            escalated.set()

    policy = RecoveryPolicy(attempts=1, initial_backoff=0.0, max_cycles=2, cycle_window=3600)
    manager = make_manager(compression=layer, recovery={"compression": policy})
    manager.add_listener(listen)
    manager.start()
    assert not manager.attempt_component_recovery("compression")
    assert not manager.attempt_component_recovery("compression")
    assert not manager.attempt_component_recovery("compression")  # third: over the intensity
    assert escalated.wait(5)
    stops = layer.calls.count("stop")
    assert stops == 2
    manager.check_component_health()  # a tick must not start a cycle either
    assert layer.calls.count("stop") == stops
    assert manager.health().components["compression"].status == "failed"
    layer.healthy = True
    layer.heal_on_restart = True
    manager.reset_component("compression")
    assert manager.health().components["compression"].status == "unhealthy"
    layer.healthy = False
    assert manager.attempt_component_recovery("compression")
    wait_until(lambda: any(isinstance(e, dwcp.RecoverySucceeded) for e in seen))
    escalations = [e for e in seen if isinstance(e, dwcp.ComponentEscalated)]
    assert escalations == [dwcp.ComponentEscalated("compression", 2, 3600, manager="dwcp")]


def test_adaptive_backoff_through_the_manager(make_manager: MakeManager) -> None:
    layer = FakeLayer()
    layer.heal_on_restart = True
    attempts: list[float] = []

    def listen(event: dwcp.Event) -> None:
        if isinstance(event, dwcp.RecoveryAttempt):
            attempts.append(event.backoff)

    policy = RecoveryPolicy(initial_backoff=0.001, adaptive_backoff=True, stable_period=3600)
    manager = make_manager(compression=layer, recovery={"compression": policy})
    manager.add_listener(listen)
    manager.start()
    for _ in range(3):  # fails again right after every recovery
        layer.healthy = False
        assert manager.attempt_component_recovery("compression")
    wait_until(lambda: len(attempts) == 3)
    assert attempts == [0.001, 0.002, 0.004]


def test_an_escalated_component_runs_no_cycle_until_the_cooldown_ends(
    make_manager: MakeManager,
) -> None:
    """README.md, "Recovery policies": "An escalated component emits `ComponentEscalated` and
    runs no cycle until `manager.reset_component("sync")` or the cool-down." """
    layer = FakeLayer()
    layer.healthy = False
    clock = FakeClock()
    seen: list[dwcp.Event] = []
    policy = RecoveryPolicy(
        attempts=1, initial_backoff=0.0, max_cycles=2, cycle_window=3600, cooldown=300
    )
    manager = make_manager(compression=layer, recovery={"compression": policy}, clock=clock)
    manager.add_listener(seen.append)
    manager.start()
    for _ in range(3):  # the third is over the intensity
        assert not manager.attempt_component_recovery("compression")
    wait_until(lambda: any(isinstance(e, dwcp.ComponentEscalated) for e in seen))
    stops = layer.calls.count("stop")
    clock.advance(299.0)
    manager.check_component_health()  # still cooling down: no cycle
    assert layer.calls.count("stop") == stops
    assert manager.health().components["compression"].status == "failed"
    layer.heal_on_restart = True
    clock.advance(2.0)  # past the cool-down: the next tick recovers it
    manager.check_component_health()
    wait_until(lambda: any(isinstance(e, dwcp.RecoverySucceeded) for e in seen))
    assert layer.calls.count("stop") == stops + 1
    assert manager.health().components["compression"].status == "healthy"
