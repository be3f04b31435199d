"""The phi accrual failure detector against Akka's formula and published behaviour."""

from __future__ import annotations

import itertools
import math
import statistics
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import dwcp
from dwcp._recovery import RecoveryPolicy
from dwcp._suspicion import ComponentSuspicion, PhiAccrualFailureDetector, phi
from dwcp.http import health_document
from dwcp.prometheus import register_metrics
from dwcp.testing import FakeClock


def akka_phi(time_diff: float, mean: float, std: float) -> float:
    """Akka's PhiAccrualFailureDetector.phi, transcribed branch for branch."""
    y = (time_diff - mean) / std
    e = math.exp(-y * (1.5976 + 0.070566 * y * y))
    if time_diff > mean:
        return -math.log10(e / (1.0 + e))
    return -math.log10(1.0 - 1.0 / (1.0 + e))


def normal_cdf(x: float, mean: float, std: float) -> float:
    return 0.5 * (1 + math.erf((x - mean) / (std * math.sqrt(2))))


def detector(**kwargs: float) -> PhiAccrualFailureDetector:
    # Akka's own test defaults: min-std-deviation 10 ms, no acceptable pause, 1 s estimate.
    settings: dict[str, float] = {
        "min_std_deviation": 0.01,
        "acceptable_heartbeat_pause": 0.0,
        "first_heartbeat_estimate": 1.0,
    }
    settings.update(kwargs)
    return PhiAccrualFailureDetector(**settings)  # type: ignore[arg-type]


def samples(fd: PhiAccrualFailureDetector) -> int:
    """Intervals in ``fd``'s history, the two bootstrap ones included (the library reads
    only their mean and deviation, so it has no accessor for the count)."""
    return len(fd._history)


@pytest.mark.parametrize(
    ("time_diff", "mean", "std"),
    [(0, 0, 10), (6, 0, 10), (15, 0, 10), (20, 0, 10), (25, 0, 10), (35, 0, 10), (-8, 0, 10),
     (1.0, 1.0, 0.25), (2.0, 1.0, 0.25), (0.5, 1.0, 0.25), (12.0, 10.0, 1.0)],
)  # fmt: skip
def test_phi_is_akkas_formula(time_diff: float, mean: float, std: float) -> None:
    assert phi(time_diff, mean, std) == pytest.approx(akka_phi(time_diff, mean, std), rel=1e-9)


@pytest.mark.parametrize(
    ("time_diff", "expected_cdf", "tolerance"),
    # Akka's "use good enough cumulative distribution function" test (mean 0, sd 10 ms).
    [(0, 0.5, 0.001), (6, 0.7257, 0.05), (15, 0.9332, 0.05), (20, 0.97725, 0.05),
     (25, 0.99379, 0.05), (35, 0.99977, 0.05), (40, 0.99997, 0.0001)],
)  # fmt: skip
def test_phi_approximates_the_normal_tail(
    time_diff: float, expected_cdf: float, tolerance: float
) -> None:
    cdf = 1 - 10 ** -phi(time_diff, 0, 10)
    assert cdf == pytest.approx(expected_cdf, abs=tolerance)
    assert cdf == pytest.approx(normal_cdf(time_diff, 0, 10), abs=tolerance)


def test_phi_does_not_overflow_far_from_the_mean() -> None:
    assert phi(1e9, 0, 1) > 1e20
    assert phi(-1e9, 0, 1) == 0.0


def test_phi_is_zero_before_the_first_heartbeat() -> None:
    assert detector().phi(now=123.0) == 0.0


def test_one_heartbeat_uses_the_first_estimate() -> None:
    # Akka: "return phi based on guess when only one heartbeat": the history is bootstrapped
    # with 750 ms and 1250 ms, so mean 1 s and deviation 250 ms.
    fd = detector()
    fd.heartbeat(now=0.0)
    assert fd.mean == pytest.approx(1.0)
    assert fd.std_deviation == pytest.approx(0.25)
    assert fd.phi(now=1.0) == pytest.approx(math.log10(2))  # at the mean: 0.30
    assert fd.phi(now=2.0) == pytest.approx(akka_phi(2.0, 1.0, 0.25))
    assert fd.phi(now=2.0) == pytest.approx(4.5, abs=0.3)  # Akka's expected 4.5 +- 0.3
    assert fd.phi(now=3.0) > 15


def test_phi_rises_with_the_time_since_the_last_heartbeat() -> None:
    fd = detector()
    for t in range(10):
        fd.heartbeat(now=float(t))
    levels = [fd.phi(now=9.0 + dt / 10) for dt in range(40)]
    assert levels == sorted(levels)
    assert levels[0] < 1 < levels[-1]
    assert fd.phi(now=9.5) < fd.threshold <= fd.phi(now=13.0)


def test_intervals_are_summarised_by_mean_and_deviation() -> None:
    fd = detector()
    times = [0.0, 1.0, 2.1, 2.9, 4.2, 5.0, 6.05]
    for t in times:
        fd.heartbeat(now=t)
    intervals = [0.75, 1.25] + [b - a for a, b in itertools.pairwise(times)]
    assert samples(fd) == len(intervals)
    assert fd.mean == pytest.approx(statistics.fmean(intervals))
    assert fd.std_deviation == pytest.approx(statistics.pstdev(intervals))
    expected = akka_phi(7.5 - 6.05, statistics.fmean(intervals), statistics.pstdev(intervals))
    assert fd.phi(now=7.5) == pytest.approx(expected)


def test_min_std_deviation_bounds_the_deviation() -> None:
    # Perfectly regular heartbeats have no deviation; min_std_deviation stands in for it.
    tight, loose = detector(min_std_deviation=0.01), detector(min_std_deviation=0.2)
    for fd in (tight, loose):
        fd.add_interval(1.0)  # pull the bootstrap towards 1 s
        for _ in range(998):
            fd.add_interval(1.0)
    for fd, std in ((tight, 0.01), (loose, 0.2)):
        assert fd.std_deviation < std
        assert fd.phi_after(1.1) == pytest.approx(akka_phi(1.1, fd.mean, std))
    assert tight.phi_after(1.1) > loose.phi_after(1.1)


def test_acceptable_pause_shifts_the_mean() -> None:
    plain, paused = detector(), detector(acceptable_heartbeat_pause=3.0)
    for fd in (plain, paused):
        for t in range(20):
            fd.heartbeat(now=float(t))
    for dt in (0.5, 1.0, 2.0, 4.0, 5.0):
        assert paused.phi(now=19 + dt + 3.0) == pytest.approx(plain.phi(now=19 + dt))
    assert plain.phi(now=22.0) > 8 > paused.phi(now=22.0)


def test_heartbeat_after_unavailability_is_not_recorded() -> None:
    fd = detector()
    for t in range(10):
        fd.heartbeat(now=float(t))
    count, mean = samples(fd), fd.mean
    fd.heartbeat(now=100.0)  # after a long silence: not an interval of the normal pattern
    assert samples(fd) == count and fd.mean == mean
    fd.heartbeat(now=101.0)
    assert samples(fd) == count + 1


def test_the_window_keeps_the_last_samples_with_exact_running_sums() -> None:
    fd = detector(max_sample_size=5)
    values = [0.1 * (i % 7) + 1e6 * (i == 3) for i in range(1000)]
    for v in values:
        fd.add_interval(v)
    last = values[-5:]
    assert samples(fd) == 5
    assert fd.mean == pytest.approx(statistics.fmean(last), abs=1e-9)
    assert fd.std_deviation == pytest.approx(statistics.pstdev(last), abs=1e-6)


def test_concurrent_heartbeats_are_all_counted() -> None:
    fd = detector(max_sample_size=100_000)
    start = threading.Barrier(4)

    def beat() -> None:
        start.wait(5)
        for i in range(500):
            fd.add_interval(1.0 + i % 3)

    threads = [threading.Thread(target=beat, name=f"beat-{n}") for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert samples(fd) == 2 + 4 * 500


def test_clock_is_used_when_no_time_is_given() -> None:
    now = [0.0]
    fd = PhiAccrualFailureDetector(clock=lambda: now[0], acceptable_heartbeat_pause=0.0)
    fd.heartbeat()
    now[0] = 1.0
    assert fd.phi() == pytest.approx(math.log10(2))


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"threshold": 0}, ValueError, "threshold"),
        ({"threshold": "8"}, TypeError, "threshold"),
        ({"max_sample_size": 0}, ValueError, "max_sample_size"),
        ({"max_sample_size": 2.5}, TypeError, "max_sample_size"),
        ({"min_std_deviation": 0}, ValueError, "min_std_deviation"),
        ({"acceptable_heartbeat_pause": -1}, ValueError, "acceptable_heartbeat_pause"),
        ({"first_heartbeat_estimate": math.inf}, ValueError, "first_heartbeat_estimate"),
        ({"clock": 5}, TypeError, "clock"),
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, object], error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        PhiAccrualFailureDetector(**kwargs)  # type: ignore[arg-type]


# -- one component ----------------------------------------------------------------------------


def steady(suspicion: ComponentSuspicion, checks: int, latency: float, interval: float) -> float:
    t = 0.0
    for _ in range(checks):
        suspicion.check_started(t)
        suspicion.check_finished(t + latency, ok=True)
        t += interval
    return t


def test_component_suspicion_stays_low_while_checks_are_regular() -> None:
    s = ComponentSuspicion(threshold=8.0, interval=10.0, timeout=5.0)
    t = steady(s, 100, 0.002, 10.0)
    assert s.level(t) < 1.0
    assert s.crossed(t) is None


def test_a_check_running_long_raises_suspicion_before_it_fails() -> None:
    s = ComponentSuspicion(threshold=8.0, interval=10.0, timeout=5.0)
    t = steady(s, 100, 0.002, 10.0)
    s.check_started(t)
    levels = [s.level(t + dt) for dt in (0.01, 0.2, 0.5, 1.0, 2.0)]
    assert levels == sorted(levels)
    assert levels[0] < 8.0 < levels[-1]  # suspected well before the 5 s timeout
    assert s.crossed(t + 2.0) is not None
    assert s.crossed(t + 3.0) is None  # once per crossing
    s.check_finished(t + 3.0, ok=False)
    assert s.level(t + 4.0) > s.level(t + 3.0)  # an unanswered check keeps rising
    t2 = t + 10.0
    s.check_started(t2)
    s.check_finished(t2 + 0.002, ok=True)
    assert s.crossed(t2 + 0.01) is None and s.level(t2 + 0.01) < 8.0  # re-armed
    s.check_started(t2 + 10)
    assert s.crossed(t2 + 13) is not None  # a new crossing is reported again


def test_a_slowing_link_is_suspected_while_its_checks_still_pass() -> None:
    s = ComponentSuspicion(threshold=8.0, interval=1.0, timeout=5.0)
    t = steady(s, 200, 0.002, 1.0)
    crossed_at: float | None = None
    latency = 0.002
    for _ in range(60):
        latency *= 1.15
        s.check_started(t)
        s.check_finished(t + latency, ok=True)
        if s.crossed(t + latency) is not None:
            crossed_at = latency
            break
        t += 1.0
    assert crossed_at is not None and crossed_at < 5.0


def test_send_latencies_count_for_the_transport() -> None:
    s = ComponentSuspicion(threshold=8.0, interval=10.0, timeout=5.0)
    t = steady(s, 50, 0.002, 10.0)
    for _ in range(200):
        s.send_finished(t, 0.001, ok=True)
    assert s.level(t) < 8.0
    s.send_finished(t, 2.0, ok=True)
    assert s.level(t) > 8.0
    s.send_finished(t, 0.001, ok=True)
    s.send_finished(t + 1, 0.5, ok=False)
    assert s.level(t + 3) > 8.0  # a failed send is an answer that never came


def test_arrivals_follow_akka_scaled_to_the_interval() -> None:
    s = ComponentSuspicion(threshold=8.0, interval=10.0, timeout=5.0)
    assert s.arrivals.first_heartbeat_estimate == 10.0
    assert s.arrivals.min_std_deviation == pytest.approx(1.0)
    assert s.arrivals.acceptable_heartbeat_pause == 30.0
    assert s.arrivals.max_sample_size == 1000


# -- through the manager ----------------------------------------------------------------------


class SlowingLayer:
    """A layer whose health check takes ``latency`` seconds of fake time and passes."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.latency = 0.002

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def is_healthy(self) -> bool:
        self.clock.advance(self.latency)
        return True


def test_manager_reports_suspicion_before_any_check_fails() -> None:
    clock = FakeClock()
    layer = SlowingLayer(clock)
    seen: list[dwcp.Event] = []
    suspected = threading.Event()

    def listen(event: dwcp.Event) -> None:
        seen.append(event)
        if isinstance(event, dwcp.ComponentSuspected):
            suspected.set()

    manager = dwcp.Manager(
        compression=layer,
        clock=clock,
        health_interval=3600.0,
        recovery={"compression": RecoveryPolicy(suspicion_threshold=6.0)},
        breaker_name="suspicion-test",
    )
    manager.add_listener(listen)
    registry = CollectorRegistry()
    register_metrics(manager, registry)
    manager.start()
    try:
        for _ in range(50):
            clock.advance(10.0)
            manager.check_component_health()
        quiet = manager.health().components["compression"]
        assert quiet.healthy and quiet.suspicion < 6.0
        for _ in range(60):
            layer.latency *= 1.2
            clock.advance(10.0)
            manager.check_component_health()
            if manager.health().components["compression"].suspicion >= 6.0:
                break
        health = manager.health().components["compression"]
        assert health.status == "healthy" and health.suspicion >= 6.0
        assert layer.latency < 5.0  # well inside the check timeout: nothing failed
        assert suspected.wait(5)
        events = [e for e in seen if isinstance(e, dwcp.ComponentSuspected)]
        assert len(events) == 1
        assert events[0].component == "compression" and events[0].threshold == 6.0
        assert events[0].suspicion >= 6.0 and events[0].manager == "suspicion-test"
        assert not any(isinstance(e, dwcp.ComponentUnhealthy) for e in seen)
        _, document = health_document(manager)
        assert document["components"]["compression"]["suspicion"] >= 6.0
        text = generate_latest(registry).decode()
        gauges = [
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "dwcp_component_suspicion" and s.labels["component"] == "compression"
        ]
        assert gauges and gauges[0] >= 6.0
    finally:
        manager.stop()


def test_default_health_reports_no_suspicion() -> None:
    health = dwcp.ComponentHealth("transport", "healthy", None, 1.0)
    assert health.suspicion == 0.0


# -- issue 21, point 9: 0 when healthy, not stuck by one failed send, a short history ----------


def test_a_component_answering_as_usual_reads_zero() -> None:
    s = ComponentSuspicion(threshold=8.0, interval=10.0, timeout=5.0)
    t = steady(s, 30, 0.002, 10.0)
    # Read anywhere between two passes: every channel as usual, so exactly 0.
    assert [s.level(t - 10.0 + dt) for dt in (0.002, 1.0, 5.0, 9.9)] == [0.0] * 4


def test_manager_reads_zero_suspicion_while_healthy() -> None:
    clock = FakeClock()
    transport = dwcp.testing.FakeTransport()
    manager = dwcp.Manager(transport, health_interval=3600.0, clock=clock)
    manager.start()
    try:
        for _ in range(10):
            clock.advance(10.0)
            manager.check_component_health()
            assert manager.health().components["transport"].suspicion == 0.0
    finally:
        manager.stop()


def test_one_failed_send_is_forgotten_once_the_component_answers_again() -> None:
    s = ComponentSuspicion(threshold=8.0, interval=10.0, timeout=5.0)
    t = steady(s, 30, 0.002, 10.0)
    s.send_finished(t - 5.0, 0.001, ok=False)
    assert s.level(t - 1.0) > 8.0  # not answered: suspected until something succeeds
    s.check_started(t)
    s.check_finished(t + 0.002, ok=True)  # the next passing check
    assert s.level(t + 0.01) == 0.0 and s.crossed(t + 0.01) is None
    # And a sampled successful send clears it too.
    s.send_finished(t + 1.0, 0.001, ok=False)
    s.send_finished(t + 2.0, 0.001, ok=True)
    assert s.level(t + 2.5) == 0.0


def test_manager_is_not_left_suspecting_the_transport_after_one_failed_send() -> None:
    clock = FakeClock()
    transport = dwcp.testing.FakeTransport()
    events: list[object] = []
    manager = dwcp.Manager(transport, health_interval=3600.0, clock=clock)
    manager.add_listener(events.append)
    manager.start()
    try:
        for _ in range(10):
            clock.advance(10.0)
            manager.check_component_health()
        transport.fail_sends = ConnectionResetError("one reset")
        with pytest.raises(dwcp.TransportError):
            manager.send_with_circuit_breaker(b"x")
        transport.fail_sends = None
        for _ in range(3):
            clock.advance(10.0)
            manager.check_component_health()  # every check passes
            assert manager.health().components["transport"].suspicion == 0.0
        assert not any(isinstance(e, dwcp.ComponentSuspected) for e in events)
    finally:
        manager.stop()


@pytest.mark.parametrize("steady_checks", [5, 10, 30])
def test_a_jump_in_latency_is_suspected_after_a_short_history(steady_checks: int) -> None:
    # Five measured latencies (WARMUP) are enough: 1 ms checks, then one of 300 ms (six
    # hundredths of the 5 s timeout over the usual) while every check still passes.
    s = ComponentSuspicion(threshold=8.0, interval=10.0, timeout=5.0)
    t = steady(s, steady_checks, 0.001, 10.0)
    s.check_started(t)
    s.check_finished(t + 0.3, ok=True)
    assert s.crossed(t + 0.3) is not None
    # Slower for good: once that is the norm, it is no longer suspected.
    t += 10.0
    for _ in range(30):
        s.check_started(t)
        s.check_finished(t + 0.3, ok=True)
        t += 10.0
    assert s.level(t - 9.0) < 1.0
