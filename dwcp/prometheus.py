"""Prometheus metrics for a Manager, read from its snapshots at scrape time.

``prometheus_client`` is an optional extra (``pip install 'dwcp[prometheus]'``); importing
``dwcp`` never needs it, only this module does.  The collector keeps no state of its own:
each scrape takes one ``manager.metrics()`` and one ``manager.health()`` snapshot, so the
values are exactly what the manager reports and no lock is held while Prometheus encodes them.

Exposed metrics::

    dwcp_health_checks_total                          health-check passes run
    dwcp_component_checks_total                       individual component checks run
    dwcp_component_up{component}                      1 healthy, 0 otherwise
    dwcp_component_status{component,status}          one-hot over healthy/unhealthy/recovering/failed
    dwcp_recovery_attempts_total{component}           recovery attempts started
    dwcp_recoveries_total{component,result}           finished recovery cycles: succeeded/failed
    dwcp_component_downtime_seconds_total{component}  time from first failed check to recovery
    dwcp_breaker_state{state}                         one-hot over closed/open/half-open
    dwcp_breaker_transitions_total{from_state,to_state}  breaker state changes
    dwcp_breaker_rejections_total                     sends refused by the breaker
    dwcp_sends_total                                  sends that succeeded
    dwcp_sent_bytes_total                             bytes those sends carried
    dwcp_send_errors_total                            sends the transport failed

A manager without a transport reports every ``dwcp_breaker_state`` sample as 0.

With ``Manager(cluster=...)``, per node of the cluster (``dwcp.cluster``)::

    dwcp_cluster_node_up{node}                        1 alive (heard within its bound), 0 not
    dwcp_cluster_node_healthy{node}                   1 when its last snapshot was healthy
    dwcp_cluster_node_heartbeat_age_seconds{node}     age of its last heartbeat
    dwcp_cluster_view_stale                           1 while the cluster's Redis is unreachable
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, get_args

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import REGISTRY, CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised by a test that hides the package
    raise ImportError(
        "dwcp.prometheus needs the optional prometheus_client package: "
        "pip install 'dwcp[prometheus]'"
    ) from exc

from dwcp.breaker import CLOSED, HALF_OPEN, OPEN
from dwcp.errors import DWCPError
from dwcp.health import ComponentStatus, HealthSnapshot, MetricsSnapshot

if TYPE_CHECKING:
    from dwcp.manager import Manager

__all__ = ["DWCPCollector", "register_metrics"]

_STATUSES: tuple[str, ...] = get_args(ComponentStatus)
_BREAKER_STATES = (CLOSED, OPEN, HALF_OPEN)


class DWCPCollector:
    """A ``prometheus_client`` collector exposing one Manager's health and counters."""

    def __init__(self, manager: Manager) -> None:
        self._manager = manager

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples, so registration never calls into the manager."""
        return _families(None, None)

    def collect(self) -> Iterator[Metric]:
        """The metric families with values from fresh manager snapshots."""
        metrics = self._manager.metrics()
        health = self._manager.health()
        yield from _families(metrics, health)
        yield from _cluster_families(self._manager)


def register_metrics(manager: Manager, registry: CollectorRegistry | None = None) -> DWCPCollector:
    """Register a ``DWCPCollector`` for ``manager`` on ``registry`` (default: the global one).

    Returns the collector, so the caller can ``registry.unregister()`` it later.
    """
    collector = DWCPCollector(manager)
    (REGISTRY if registry is None else registry).register(collector)
    return collector


def _counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _families(metrics: MetricsSnapshot | None, health: HealthSnapshot | None) -> Iterator[Metric]:
    # One function builds both the description (snapshots None: no samples) and the scrape,
    # so the two can never disagree on names, types or labels.
    health_checks = _counter("dwcp_health_checks", "Health-check passes run.")
    component_checks = _counter("dwcp_component_checks", "Individual component checks run.")
    up = GaugeMetricFamily(
        "dwcp_component_up",
        "Whether the component is healthy (1) or not (0).",
        labels=["component"],
    )
    status = GaugeMetricFamily(
        "dwcp_component_status",
        "The component's current status, one-hot over healthy/unhealthy/recovering/failed.",
        labels=["component", "status"],
    )
    attempts = _counter(
        "dwcp_recovery_attempts", "Recovery attempts started.", labels=["component"]
    )
    recoveries = _counter(
        "dwcp_recoveries", "Finished recovery cycles by result.", labels=["component", "result"]
    )
    downtime = _counter(
        "dwcp_component_downtime_seconds",
        "Seconds from a component's first failed check to its verified recovery, summed.",
        labels=["component"],
    )
    breaker = GaugeMetricFamily(
        "dwcp_breaker_state",
        "The circuit breaker's state, one-hot over closed/open/half-open.",
        labels=["state"],
    )
    transitions = _counter(
        "dwcp_breaker_transitions",
        "Circuit-breaker state changes.",
        labels=["from_state", "to_state"],
    )
    rejections = _counter("dwcp_breaker_rejections", "Sends refused by the circuit breaker.")
    sends = _counter("dwcp_sends", "Sends the transport completed.")
    sent_bytes = _counter("dwcp_sent_bytes", "Bytes carried by completed sends.")
    send_errors = _counter("dwcp_send_errors", "Sends the transport failed.")

    if metrics is not None and health is not None:
        health_checks.add_metric([], metrics.health_checks)
        component_checks.add_metric([], metrics.component_checks)
        for name, component in health.components.items():
            up.add_metric([name], 1.0 if component.healthy else 0.0)
            for value in _STATUSES:
                status.add_metric([name, value], 1.0 if component.status == value else 0.0)
        for name, counts in metrics.components.items():
            attempts.add_metric([name], counts.recovery_attempts)
            recoveries.add_metric([name, "succeeded"], counts.recoveries_succeeded)
            recoveries.add_metric([name, "failed"], counts.recoveries_failed)
        for name, seconds in metrics.downtime_seconds.items():
            downtime.add_metric([name], seconds)
        for state in _BREAKER_STATES:
            breaker.add_metric([state], 1.0 if health.breaker_state == state else 0.0)
        for old in _BREAKER_STATES:
            for new in _BREAKER_STATES:
                if old != new:
                    count = metrics.breaker_transitions.get((old, new), 0)
                    transitions.add_metric([old, new], count)
        rejections.add_metric([], metrics.breaker_rejections)
        sends.add_metric([], metrics.sends)
        sent_bytes.add_metric([], metrics.sent_bytes)
        send_errors.add_metric([], metrics.send_errors)

    yield from (
        health_checks,
        component_checks,
        up,
        status,
        attempts,
        recoveries,
        downtime,
        breaker,
        transitions,
        rejections,
        sends,
        sent_bytes,
        send_errors,
    )


def _cluster_families(manager: Manager) -> Iterator[Metric]:
    # Only for a manager with a cluster; the view is the last one read, so no I/O here.
    try:
        view = manager.cluster_health()
    except DWCPError:
        return
    up = GaugeMetricFamily(
        "dwcp_cluster_node_up", "Whether the cluster node was heard from within its bound.",
        labels=["node"],
    )  # fmt: skip
    healthy = GaugeMetricFamily(
        "dwcp_cluster_node_healthy", "Whether the node's last snapshot was healthy.",
        labels=["node"],
    )  # fmt: skip
    age = GaugeMetricFamily(
        "dwcp_cluster_node_heartbeat_age_seconds", "Age of the node's last heartbeat.",
        labels=["node"],
    )  # fmt: skip
    for node in view.nodes.values():
        up.add_metric([node.node], 1.0 if node.alive else 0.0)
        healthy.add_metric([node.node], 1.0 if node.healthy else 0.0)
        age.add_metric([node.node], node.age)
    stale = GaugeMetricFamily(
        "dwcp_cluster_view_stale", "1 while the cluster view is stale (Redis unreachable)."
    )
    stale.add_metric([], 1.0 if view.stale else 0.0)
    yield from (up, healthy, age, stale)
