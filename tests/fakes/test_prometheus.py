"""The Prometheus collector, read back through the text exposition a scraper would parse."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import MappingProxyType

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as _openmetrics_exposition
from prometheus_client.openmetrics import parser as _openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import REGISTRY

import dwcp
from dwcp._latency import SEND_BUCKETS, LatencyRecorder
from dwcp._status import SendTallies
from dwcp.prometheus import DWCPCollector, register_metrics, unregister_metrics
from dwcp.testing import FakeLayer, FakeTransport
from tests.conftest import wait_until

MakeManager = Callable[..., dwcp.Manager]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# prometheus_client's OpenMetrics modules are unannotated; these are their documented types.
openmetrics_generate: Callable[[CollectorRegistry], bytes] = _openmetrics_exposition.generate_latest
openmetrics_parse: Callable[[str], Iterable[Metric]] = (
    _openmetrics_parser.text_string_to_metric_families
)

ROOT = Path(__file__).resolve().parents[2]


def scrape(registry: CollectorRegistry) -> Samples:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    labels.setdefault("manager", "dwcp")
    return samples[(name, tuple(sorted(labels.items())))]


def one_hot(samples: Samples, name: str, label: str, **fixed: str) -> str:
    """The single label value whose sample is 1, checking every other one is 0."""
    fixed.setdefault("manager", "dwcp")
    hot = [
        dict(labels)[label]
        for (n, labels), v in samples.items()
        if n == name and all(dict(labels).get(k) == x for k, x in fixed.items()) and v == 1.0
    ]
    rest = [
        v
        for (n, labels), v in samples.items()
        if n == name and all(dict(labels).get(k) == x for k, x in fixed.items()) and v != 1.0
    ]
    assert len(hot) == 1 and all(v == 0.0 for v in rest), (name, fixed, samples)
    return hot[0]


def transitions(samples: Samples) -> dict[tuple[str, str], float]:
    """The non-zero breaker transitions by (from, to)."""
    found = {}
    for (name, labels), v in samples.items():
        if name == "dwcp_breaker_transitions_total" and v and dict(labels)["manager"] == "dwcp":
            found[(dict(labels)["from_state"], dict(labels)["to_state"])] = v
    return found


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_fresh_manager_exposes_every_metric(
    make_manager: MakeManager, registry: CollectorRegistry
) -> None:
    manager = make_manager(FakeTransport(), compression=FakeLayer())
    register_metrics(manager, registry)
    manager.start()
    samples = scrape(registry)

    for name in (
        "dwcp_health_checks_total",
        "dwcp_component_checks_total",
        "dwcp_breaker_rejections_total",
        "dwcp_sends_total",
        "dwcp_sent_bytes_total",
        "dwcp_send_errors_total",
        "dwcp_calls_total",
        "dwcp_call_errors_total",
        "dwcp_call_rejections_total",
    ):
        assert value(samples, name) == 0.0, name
    assert transitions(samples) == {}
    for component in ("transport", "compression"):
        assert value(samples, "dwcp_recovery_attempts_total", component=component) == 0.0
        for result in ("succeeded", "failed"):
            labels = {"component": component, "result": result}
            assert value(samples, "dwcp_recoveries_total", **labels) == 0.0
        assert value(samples, "dwcp_component_up", component=component) == 1.0
        assert value(samples, "dwcp_component_downtime_seconds_total", component=component) == 0
        assert one_hot(samples, "dwcp_component_status", "status", component=component) == (
            "healthy"
        )
    assert one_hot(samples, "dwcp_breaker_state", "state") == "closed"


def test_values_follow_a_scripted_failure_and_recovery(
    make_manager: MakeManager, registry: CollectorRegistry
) -> None:
    transport = FakeTransport()
    manager = make_manager(
        transport, health_interval=3600, initial_backoff=0.01, max_retries=2, max_failures=2
    )
    register_metrics(manager, registry)
    manager.start()
    manager.send_with_circuit_breaker(b"hello")

    # The peer goes away: two failed sends open the breaker, the third is rejected.
    transport.healthy = False
    transport.fail_sends = ConnectionError("peer unreachable")
    for _ in range(2):
        with pytest.raises(dwcp.TransportError):
            manager.send_with_circuit_breaker(b"lost")
    with pytest.raises(dwcp.CircuitOpenError):
        manager.send_with_circuit_breaker(b"rejected")
    manager.check_component_health()
    wait_until(lambda: manager.metrics().recoveries_failed == 1)

    down = scrape(registry)
    assert value(down, "dwcp_health_checks_total") == 1
    assert value(down, "dwcp_component_up", component="transport") == 0
    assert one_hot(down, "dwcp_component_status", "status", component="transport") == "failed"
    assert value(down, "dwcp_recovery_attempts_total", component="transport") == 2
    assert value(down, "dwcp_recoveries_total", component="transport", result="failed") == 1
    assert value(down, "dwcp_recoveries_total", component="transport", result="succeeded") == 0
    assert value(down, "dwcp_component_downtime_seconds_total", component="transport") > 0
    assert one_hot(down, "dwcp_breaker_state", "state") == "open"
    assert transitions(down) == {("closed", "open"): 1}
    assert value(down, "dwcp_breaker_rejections_total") == 1
    assert value(down, "dwcp_sends_total") == 1
    assert value(down, "dwcp_sent_bytes_total") == 5
    assert value(down, "dwcp_send_errors_total") == 2

    # The peer is back: a verified recovery, then a trial send closes the breaker.
    transport.healthy = True
    transport.fail_sends = None
    assert manager.attempt_component_recovery("transport") is True

    up = scrape(registry)
    assert value(up, "dwcp_component_up", component="transport") == 1
    assert one_hot(up, "dwcp_component_status", "status", component="transport") == "healthy"
    assert value(up, "dwcp_recovery_attempts_total", component="transport") == 3
    assert value(up, "dwcp_recoveries_total", component="transport", result="succeeded") == 1
    assert value(up, "dwcp_recoveries_total", component="transport", result="failed") == 1
    assert one_hot(up, "dwcp_breaker_state", "state") == "half-open"
    assert transitions(up) == {("closed", "open"): 1, ("open", "half-open"): 1}
    downtime = value(up, "dwcp_component_downtime_seconds_total", component="transport")
    assert downtime >= value(down, "dwcp_component_downtime_seconds_total", component="transport")

    manager.send_with_circuit_breaker(b"again")
    after = scrape(registry)
    assert one_hot(after, "dwcp_breaker_state", "state") == "closed"
    assert transitions(after) == {
        ("closed", "open"): 1,
        ("open", "half-open"): 1,
        ("half-open", "closed"): 1,
    }
    assert value(after, "dwcp_sends_total") == 2
    assert value(after, "dwcp_sent_bytes_total") == 10
    # Downtime stops growing once the component recovered.
    assert value(after, "dwcp_component_downtime_seconds_total", component="transport") == (
        downtime
    )


def test_layer_status_is_labelled_per_component(
    make_manager: MakeManager, registry: CollectorRegistry
) -> None:
    layer = FakeLayer()
    manager = make_manager(FakeTransport(), sync=layer, initial_backoff=0.01, max_retries=1)
    register_metrics(manager, registry)
    manager.start()
    layer.healthy = False
    assert manager.attempt_component_recovery("sync") is False

    samples = scrape(registry)
    assert value(samples, "dwcp_component_up", component="sync") == 0
    assert value(samples, "dwcp_component_up", component="transport") == 1
    assert one_hot(samples, "dwcp_component_status", "status", component="sync") == "failed"


def test_a_manager_without_a_transport_reports_the_breaker_its_calls_use(
    make_manager: MakeManager, registry: CollectorRegistry
) -> None:
    manager = make_manager(None, compression=FakeLayer(), max_failures=1)
    register_metrics(manager, registry)
    assert one_hot(scrape(registry), "dwcp_breaker_state", "state") == "closed"
    manager.start()
    assert manager.call(divmod, 7, 2) == (3, 1)
    with pytest.raises(TimeoutError):
        manager.call(raise_timeout)
    with pytest.raises(dwcp.CircuitOpenError):
        manager.call(raise_timeout)
    samples = scrape(registry)
    assert one_hot(samples, "dwcp_breaker_state", "state") == "open"
    assert value(samples, "dwcp_calls_total") == 1
    assert value(samples, "dwcp_call_errors_total") == 1
    assert value(samples, "dwcp_call_rejections_total") == 1
    assert value(samples, "dwcp_breaker_rejections_total") == 1
    assert value(samples, "dwcp_send_errors_total") == 0


def raise_timeout() -> None:
    raise TimeoutError("peer too slow")


def test_register_metrics_uses_the_default_registry(make_manager: MakeManager) -> None:
    collector = register_metrics(make_manager(FakeTransport()))
    try:
        assert isinstance(collector, DWCPCollector)
        assert b"dwcp_component_up" in generate_latest(REGISTRY)
    finally:
        REGISTRY.unregister(collector)


def test_two_managers_with_one_name_on_one_registry_are_refused(
    make_manager: MakeManager, registry: CollectorRegistry
) -> None:
    register_metrics(make_manager(FakeTransport()), registry)
    with pytest.raises(ValueError, match="'dwcp' is already exposed.*breaker_name"):
        register_metrics(make_manager(FakeTransport()), registry)
    with pytest.raises(TypeError, match="name must be a str"):
        register_metrics(make_manager(FakeTransport()), registry, name=7)  # type: ignore[arg-type]


def test_registration_does_not_call_into_the_manager() -> None:
    class Unreadable:
        def metrics(self) -> object:
            raise AssertionError("collect() ran at registration")

        health = metrics

    # auto_describe makes the registry ask for names; describe() answers without snapshots.
    register_metrics(Unreadable(), CollectorRegistry(auto_describe=True))  # type: ignore[arg-type]


def test_missing_prometheus_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "prometheus_client"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "dwcp.prometheus")
    with pytest.raises(ImportError, match=r"pip install 'dwcp\[prometheus\]'"):
        importlib.import_module("dwcp.prometheus")


def test_importing_dwcp_does_not_import_prometheus_client() -> None:
    code = "import sys, dwcp; sys.exit('prometheus_client' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr.decode()


# -- several managers, every sample labelled ---------------------------------------------------


def test_two_managers_share_a_registry_told_apart_by_the_manager_label(
    make_manager: MakeManager, registry: CollectorRegistry
) -> None:
    payments, audit = make_manager(FakeTransport()), make_manager(FakeTransport())
    first = register_metrics(payments, registry, name="payments")
    assert register_metrics(audit, registry, name="audit") is first
    payments.start()
    audit.start()
    payments.send_with_circuit_breaker(b"abc")

    text = generate_latest(registry).decode()
    # Each family is described once, or Prometheus' own parser refuses the whole scrape.
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
    assert len(helps) == len(set(helps))
    samples = scrape(registry)
    assert value(samples, "dwcp_sends_total", manager="payments") == 1
    assert value(samples, "dwcp_sends_total", manager="audit") == 0
    assert {dict(labels)["manager"] for (_, labels) in samples} == {"payments", "audit"}

    # The strict OpenMetrics parser accepts the same scrape.
    exposition = openmetrics_generate(registry).decode()
    families = {f.name: f for f in openmetrics_parse(exposition)}
    assert {s.labels["manager"] for s in families["dwcp_sends"].samples} == {"payments", "audit"}

    unregister_metrics(payments, registry)
    assert {dict(labels)["manager"] for (_, labels) in scrape(registry)} == {"audit"}
    unregister_metrics(audit, registry)
    assert generate_latest(registry) == b""
    with pytest.raises(ValueError, match="no dwcp manager"):
        unregister_metrics(audit, registry)
    # The registry is free again, for a fresh collector.
    register_metrics(audit, registry)
    assert value(scrape(registry), "dwcp_sends_total") == 0


def test_the_label_is_the_managers_breaker_name_by_default(
    make_manager: MakeManager, registry: CollectorRegistry
) -> None:
    payments = make_manager(FakeTransport(), breaker_name="payments-peer")
    register_metrics(payments, registry)
    register_metrics(make_manager(FakeTransport(), breaker_name="audit-peer"), registry)
    payments.start()
    payments.send_with_circuit_breaker(b"abcd")
    samples = scrape(registry)
    assert value(samples, "dwcp_sent_bytes_total", manager="payments-peer") == 4
    assert value(samples, "dwcp_sent_bytes_total", manager="audit-peer") == 0


# -- what the snapshots carry ------------------------------------------------------------------


#: Every counter zero, every other field at its default.
NO_COUNTS = dwcp.MetricsSnapshot(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


class Snapshots:
    """A metrics source that serves the snapshots a test builds, as a Manager would."""

    def __init__(self, metrics: dwcp.MetricsSnapshot | None = None, name: str = "") -> None:
        self.name = name
        self.snapshot = metrics or NO_COUNTS
        self.breaker_state = "closed"

    def metrics(self) -> dwcp.MetricsSnapshot:
        return self.snapshot

    def health(self) -> dwcp.HealthSnapshot:
        return dwcp.HealthSnapshot(MappingProxyType({}), self.breaker_state)


def test_dropped_events_storage_mode_and_errors_and_build_info(
    registry: CollectorRegistry,
) -> None:
    source = Snapshots(
        dataclasses.replace(
            NO_COUNTS, breaker_storage="fallback", breaker_storage_errors=3, events_dropped=7
        )
    )
    register_metrics(source, registry)  # type: ignore[arg-type]
    samples = scrape(registry)
    assert value(samples, "dwcp_events_dropped_total") == 7
    assert value(samples, "dwcp_breaker_storage_errors_total") == 3
    assert one_hot(samples, "dwcp_breaker_storage", "mode") == "fallback"
    assert value(samples, "dwcp_build_info", version=dwcp.__version__) == 1


def test_a_real_manager_reports_local_storage(
    make_manager: MakeManager, registry: CollectorRegistry
) -> None:
    register_metrics(make_manager(FakeTransport()), registry)
    samples = scrape(registry)
    assert one_hot(samples, "dwcp_breaker_storage", "mode") == "local"
    assert value(samples, "dwcp_breaker_storage_errors_total") == 0
    assert value(samples, "dwcp_events_dropped_total") == 0


def test_latency_histograms_from_the_recorder(registry: CollectorRegistry) -> None:
    recorder, tallies = LatencyRecorder(), SendTallies()
    tally = tallies.new_tally()
    for seconds in (0.0002, 0.0004, 0.003, 42.0):
        tallies.observe(tally, seconds)
    recorder.observe_recovery("transport", 3.5)
    recorder.observe_health_check("transport", 0.002)
    recorder.observe_health_check("sync", 5.0)
    send = tallies.histogram()
    recovery, checks = recorder.snapshot()
    source = Snapshots(
        dataclasses.replace(
            NO_COUNTS, send_seconds=send, recovery_seconds=recovery, health_check_seconds=checks
        )
    )
    register_metrics(source, registry)  # type: ignore[arg-type]
    samples = scrape(registry)

    def bucket(name: str, le: str, **labels: str) -> float:
        return value(samples, f"{name}_bucket", le=le, **labels)

    assert bucket("dwcp_send_duration_seconds", "0.00025") == 1
    assert bucket("dwcp_send_duration_seconds", "0.0005") == 2
    assert bucket("dwcp_send_duration_seconds", "10.0") == 3
    assert bucket("dwcp_send_duration_seconds", "+Inf") == 4
    assert value(samples, "dwcp_send_duration_seconds_count") == 4
    assert value(samples, "dwcp_send_duration_seconds_sum") == pytest.approx(42.0036)
    assert bucket("dwcp_recovery_duration_seconds", "2.5", component="transport") == 0
    assert bucket("dwcp_recovery_duration_seconds", "5.0", component="transport") == 1
    check = "dwcp_health_check_duration_seconds"
    assert bucket(check, "0.0025", component="transport") == 1
    assert bucket(check, "2.5", component="sync") == 0
    assert bucket(check, "5.0", component="sync") == 1  # a bound counts as "less or equal"
    assert value(samples, f"{check}_count", component="sync") == 1


def test_a_manager_that_records_nothing_has_an_empty_send_histogram(
    make_manager: MakeManager, registry: CollectorRegistry
) -> None:
    register_metrics(make_manager(FakeTransport()), registry)
    samples = scrape(registry)
    assert value(samples, "dwcp_send_duration_seconds_count") == 0
    assert value(samples, "dwcp_send_duration_seconds_bucket", le="+Inf") == 0


def test_the_send_tallies_count_every_sending_thread() -> None:
    tallies = SendTallies()
    threads_per_round, per_thread = 8, 500

    def send() -> None:
        tally = tallies.new_tally()
        for i in range(per_thread):
            tallies.observe(tally, 0.001 * (i % 3))

    # Many rounds of threads sending at once: no observation is lost.
    for _ in range(10):
        threads = [threading.Thread(target=send) for _ in range(threads_per_round)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert not any(t.is_alive() for t in threads)
    send_seconds = tallies.histogram()
    total = 10 * threads_per_round * per_thread
    assert send_seconds.count == total
    # i % 3 == 0 lands in the first bucket, 0.001 in le=0.001, 0.002 in le=0.0025.
    first, at_1ms, at_2_5ms = (
        send_seconds.cumulative_counts[i] for i in (0, SEND_BUCKETS.index(0.001), 4)
    )
    assert (first, at_1ms, at_2_5ms) == (
        10 * threads_per_round * 167,
        10 * threads_per_round * 334,
        total,
    )
    assert send_seconds.sum == pytest.approx(10 * threads_per_round * (167 * 0.001 + 166 * 0.002))


def test_a_collector_of_ones_own_takes_more_managers(
    make_manager: MakeManager, registry: CollectorRegistry
) -> None:
    first, second = make_manager(FakeTransport()), make_manager(FakeTransport())
    collector = DWCPCollector(first, name="first")
    assert collector.add(second, name="second") == "second"
    registry.register(collector)
    assert set(collector.managers) == {"first", "second"}
    assert {dict(labels)["manager"] for (_, labels) in scrape(registry)} == {"first", "second"}
    collector.remove(first)
    with pytest.raises(ValueError, match="not exposed"):
        collector.remove(first)
    assert {dict(labels)["manager"] for (_, labels) in scrape(registry)} == {"second"}


def test_two_collectors_registered_by_hand_on_one_registry_are_duplicated_timeseries(
    make_manager: MakeManager, registry: CollectorRegistry
) -> None:
    """docs/observability.md, "Prometheus": "registering two `DWCPCollector` objects on one
    registry yourself still fails with prometheus_client's "Duplicated timeseries", since
    each would describe every family." """
    registry.register(DWCPCollector(make_manager(FakeTransport()), name="first"))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(DWCPCollector(make_manager(FakeTransport()), name="second"))
    assert {dict(labels)["manager"] for (_, labels) in scrape(registry)} == {"first"}


def test_before_any_observation_the_send_buckets_are_zero_and_components_have_none(
    make_manager: MakeManager, registry: CollectorRegistry
) -> None:
    """docs/observability.md, "Prometheus": "Before the first observation the send histogram
    has every bucket at 0 and the per-component ones have no samples." """
    register_metrics(make_manager(FakeTransport(), compression=FakeLayer()), registry)
    samples = scrape(registry)
    names = {name for (name, _) in samples}
    assert not {n for n in names if n.startswith("dwcp_recovery_duration_seconds")}
    assert not {n for n in names if n.startswith("dwcp_health_check_duration_seconds")}
    send = {
        dict(labels)["le"]: v
        for (name, labels), v in samples.items()
        if name == "dwcp_send_duration_seconds_bucket"
    }
    assert list(send) == [repr(float(b)) for b in SEND_BUCKETS] + ["+Inf"]
    assert set(send.values()) == {0.0}
