"""Prometheus metrics for Managers, read from their snapshots at scrape time.

``prometheus_client`` is an optional extra (``pip install 'dwcp[prometheus]'``); importing
``dwcp`` never needs it, only this module does.  The collector keeps no state of its own:
each scrape takes one ``manager.metrics()`` and one ``manager.health()`` snapshot per manager,
so the values are exactly what the managers report and no lock is held while Prometheus
encodes them.

Every sample carries a ``manager`` label, the manager's name (its ``breaker_name``), so
several managers can share one registry: ``register_metrics`` adds each to the registry's one
``DWCPCollector``, which exposes every family once with a sample per manager.

Exposed metrics (each also labelled ``manager``)::

    dwcp_build_info{version}                          1, with the dwcp version
    dwcp_health_checks_total                          health-check passes run
    dwcp_component_checks_total                       individual component checks run
    dwcp_component_up{component}                      1 healthy, 0 otherwise
    dwcp_component_suspicion{component}               phi accrual suspicion level
    dwcp_component_status{component,status}          one-hot over healthy/unhealthy/recovering/failed
    dwcp_recovery_attempts_total{component}           recovery attempts started
    dwcp_recoveries_total{component,result}           finished recovery cycles: succeeded/failed
    dwcp_component_downtime_seconds_total{component}  time from first failed check to recovery
    dwcp_breaker_state{state}                         one-hot over closed/open/half-open
    dwcp_breaker_transitions_total{from_state,to_state}  breaker state changes
    dwcp_breaker_rejections_total                     sends and guarded calls refused by the breaker
    dwcp_breaker_storage{mode}                        one-hot over local/shared/fallback
    dwcp_breaker_storage_errors_total                 failed calls to the shared (Redis) storage
    dwcp_sends_total                                  sends that succeeded
    dwcp_sent_bytes_total                             bytes those sends carried
    dwcp_send_errors_total                            sends the transport failed
    dwcp_calls_total                                  guarded calls (call(), @guard) that returned
    dwcp_call_errors_total                            guarded calls whose error counted (call_failures)
    dwcp_call_rejections_total                        guarded calls refused by the breaker
    dwcp_events_dropped_total                         events lost to a full listener queue
    dwcp_send_duration_seconds                        histogram of transport send durations
    dwcp_recovery_duration_seconds{component}         histogram of recovery cycle durations
    dwcp_health_check_duration_seconds{component}     histogram of health-check durations

A source whose breaker state is none of the three (``not_initialized``) reports every
``dwcp_breaker_state`` sample as 0; a ``Manager`` always has one, transport or not.

With ``Manager(cluster=...)``, per node of the manager's cluster view (``dwcp.cluster``;
labelled ``manager`` and ``node``)::

    dwcp_cluster_node_up{node}                        1 alive (heard within its bound), 0 not
    dwcp_cluster_node_healthy{node}                   1 when its last snapshot was healthy
    dwcp_cluster_node_heartbeat_age_seconds{node}     age of its last heartbeat
    dwcp_cluster_view_stale                           1 while the cluster's Redis is unreachable
    dwcp_cluster_records_skipped                      records the last read could not use
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, get_args

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
        Metric,
    )
    from prometheus_client.registry import REGISTRY, CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised by a test that hides the package
    raise ImportError(
        "dwcp.prometheus needs the optional prometheus_client package: "
        "pip install 'dwcp[prometheus]'"
    ) from exc

from dwcp._breaker import CLOSED, HALF_OPEN, OPEN
from dwcp._errors import DWCPError
from dwcp._health import (
    ComponentStatus,
    HealthSnapshot,
    LatencyHistogram,
    MetricsSnapshot,
    _manager_name,
)
from dwcp._version import __version__

if TYPE_CHECKING:
    from dwcp._source import HealthSource

__all__ = ["DWCPCollector", "register_metrics", "unregister_metrics"]

_STATUSES: tuple[str, ...] = get_args(ComponentStatus)
_BREAKER_STATES = (CLOSED, OPEN, HALF_OPEN)
_STORAGE_MODES = ("local", "shared", "fallback")
_Scrape = tuple[str, MetricsSnapshot, HealthSnapshot]


class DWCPCollector:
    """A ``prometheus_client`` collector exposing the health and counters of Managers.

    ``manager`` (optional) is added at once, labelled ``name`` (default: the manager's own
    name); ``add()`` and ``remove()`` change the set later.
    """

    def __init__(self, manager: HealthSource | None = None, *, name: str | None = None) -> None:
        self._lock = threading.Lock()
        self._managers: dict[str, HealthSource] = {}
        if manager is not None:
            self.add(manager, name=name)

    @property
    def managers(self) -> Mapping[str, HealthSource]:
        """The managers exposed, by their ``manager`` label."""
        with self._lock:
            return MappingProxyType(dict(self._managers))

    def add(self, manager: HealthSource, *, name: str | None = None) -> str:
        """Expose ``manager`` as ``manager=name`` (default: its own name); return the label.

        Raises ``ValueError`` when the name is taken: two managers with one name would give
        identical series.
        """
        label = _checked_name(name) if name is not None else _manager_name(manager)
        with self._lock:
            if label in self._managers:
                raise ValueError(
                    f"a manager named {label!r} is already exposed by this collector; give "
                    "each manager its own breaker_name, or pass name= to register_metrics()"
                )
            self._managers[label] = manager
        return label

    def remove(self, manager: HealthSource) -> None:
        """Stop exposing ``manager``; raises ``ValueError`` if it was not added."""
        with self._lock:
            for label, known in self._managers.items():
                if known is manager:
                    del self._managers[label]
                    return
        raise ValueError("manager is not exposed by this collector")

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples, so registration never calls into a manager;
        the cluster families too, though only managers with a cluster give them samples."""
        yield from _families(())
        yield from _cluster_metric_families()

    def collect(self) -> Iterator[Metric]:
        """The metric families with values from fresh snapshots of every manager."""
        with self._lock:
            managers = list(self._managers.items())
        # Snapshots are taken outside our lock: each manager takes its own.
        scrapes = [(label, m.metrics(), m.health()) for label, m in managers]
        yield from _families(scrapes)
        yield from _cluster_families(managers)


# One collector per registry, so every family appears once however many managers share it.
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, DWCPCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def register_metrics(
    manager: HealthSource, registry: CollectorRegistry | None = None, *, name: str | None = None
) -> DWCPCollector:
    """Expose ``manager`` on ``registry`` (default: the global one), labelled ``manager=name``.

    ``name`` defaults to the manager's own name (its ``breaker_name``).  Managers registered
    on one registry share its ``DWCPCollector``, which is returned; a second manager with
    the same name raises ``ValueError``.  ``unregister_metrics`` removes one manager again.
    """
    target = REGISTRY if registry is None else registry
    with _collectors_lock:
        collector = _collectors.get(target)
        if collector is None:
            collector = DWCPCollector()
            collector.add(manager, name=name)
            target.register(collector)
            _collectors[target] = collector
        else:
            collector.add(manager, name=name)
    return collector


def unregister_metrics(manager: HealthSource, registry: CollectorRegistry | None = None) -> None:
    """Stop exposing ``manager`` on ``registry`` (default: the global one).

    The registry's collector is unregistered with its last manager.  Raises ``ValueError``
    when ``manager`` was not registered there.
    """
    target = REGISTRY if registry is None else registry
    with _collectors_lock:
        collector = _collectors.get(target)
        if collector is None:
            raise ValueError("no dwcp manager is registered on this registry")
        collector.remove(manager)
        if not collector.managers:
            target.unregister(collector)
            del _collectors[target]


def _checked_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("name must be a non-empty string")
    return name


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=["manager", *labels])


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=["manager", *labels])


def _histogram(name: str, doc: str, labels: Sequence[str] = ()) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=["manager", *labels])


def _observe(family: HistogramMetricFamily, labels: list[str], h: LatencyHistogram) -> None:
    buckets = [(_le(bound), float(n)) for bound, n in zip(h.bounds, h.cumulative_counts)]
    buckets.append(("+Inf", float(h.count)))
    family.add_metric(labels, buckets, h.sum)


def _le(bound: float) -> str:
    # prometheus_client's own Histogram writes bounds with repr(float): "0.005", "1.0".
    return repr(float(bound))


def _families(scrapes: Sequence[_Scrape]) -> Iterator[Metric]:
    # One function builds both the description (no scrapes: no samples) and the scrape, so
    # the two can never disagree on names, types or labels.
    build = InfoMetricFamily("dwcp_build", "The dwcp library's version.", labels=["manager"])
    health_checks = _counter("dwcp_health_checks", "Health-check passes run.")
    component_checks = _counter("dwcp_component_checks", "Individual component checks run.")
    up = _gauge(
        "dwcp_component_up", "Whether the component is healthy (1) or not (0).", ["component"]
    )
    suspicion = _gauge(
        "dwcp_component_suspicion",
        "The component's phi accrual suspicion level (0: checks as usual; 8: Akka's threshold).",
        ["component"],
    )
    status = _gauge(
        "dwcp_component_status",
        "The component's current status, one-hot over healthy/unhealthy/recovering/failed.",
        ["component", "status"],
    )
    attempts = _counter("dwcp_recovery_attempts", "Recovery attempts started.", ["component"])
    recoveries = _counter(
        "dwcp_recoveries", "Finished recovery cycles by result.", ["component", "result"]
    )
    downtime = _counter(
        "dwcp_component_downtime_seconds",
        "Seconds from a component's first failed check to its verified recovery, summed.",
        ["component"],
    )
    breaker = _gauge(
        "dwcp_breaker_state",
        "The circuit breaker's state, one-hot over closed/open/half-open.",
        ["state"],
    )
    transitions = _counter(
        "dwcp_breaker_transitions", "Circuit-breaker state changes.", ["from_state", "to_state"]
    )
    rejections = _counter(
        "dwcp_breaker_rejections", "Sends and guarded calls refused by the circuit breaker."
    )
    storage = _gauge(
        "dwcp_breaker_storage",
        "Where the breaker state lives, one-hot over local/shared/fallback "
        "(fallback: Redis unreachable, local state in use).",
        ["mode"],
    )
    storage_errors = _counter(
        "dwcp_breaker_storage_errors", "Calls to the shared breaker storage (Redis) that failed."
    )
    sends = _counter("dwcp_sends", "Sends the transport completed.")
    sent_bytes = _counter("dwcp_sent_bytes", "Bytes carried by completed sends.")
    send_errors = _counter("dwcp_send_errors", "Sends the transport failed.")
    calls = _counter("dwcp_calls", "Guarded calls (call(), @guard) that returned.")
    call_errors = _counter(
        "dwcp_call_errors", "Guarded calls whose exception counted against the breaker."
    )
    call_rejections = _counter(
        "dwcp_call_rejections", "Guarded calls refused by the circuit breaker."
    )
    dropped = _counter(
        "dwcp_events_dropped", "Events not delivered to listeners because their queue was full."
    )
    send_seconds = _histogram(
        "dwcp_send_duration_seconds", "How long transport sends took, successful or not."
    )
    recovery_seconds = _histogram(
        "dwcp_recovery_duration_seconds",
        "How long recovery cycles took, from start to success or failure.",
        ["component"],
    )
    check_seconds = _histogram(
        "dwcp_health_check_duration_seconds",
        "How long component health checks took.",
        ["component"],
    )

    for name, metrics, health in scrapes:
        build.add_metric([name], {"version": __version__})
        health_checks.add_metric([name], metrics.health_checks)
        component_checks.add_metric([name], metrics.component_checks)
        for component, info in health.components.items():
            up.add_metric([name, component], 1.0 if info.healthy else 0.0)
            suspicion.add_metric([name, component], info.suspicion)
            for value in _STATUSES:
                hot = 1.0 if info.status == value else 0.0
                status.add_metric([name, component, value], hot)
        for component, counts in metrics.components.items():
            attempts.add_metric([name, component], counts.recovery_attempts)
            recoveries.add_metric([name, component, "succeeded"], counts.recoveries_succeeded)
            recoveries.add_metric([name, component, "failed"], counts.recoveries_failed)
        for component, seconds in metrics.downtime_seconds.items():
            downtime.add_metric([name, component], seconds)
        for state in _BREAKER_STATES:
            breaker.add_metric([name, state], 1.0 if health.breaker_state == state else 0.0)
        for old in _BREAKER_STATES:
            for new in _BREAKER_STATES:
                if old != new:
                    count = metrics.breaker_transitions.get((old, new), 0)
                    transitions.add_metric([name, old, new], count)
        rejections.add_metric([name], metrics.breaker_rejections)
        for mode in _STORAGE_MODES:
            storage.add_metric([name, mode], 1.0 if metrics.breaker_storage == mode else 0.0)
        storage_errors.add_metric([name], metrics.breaker_storage_errors)
        sends.add_metric([name], metrics.sends)
        sent_bytes.add_metric([name], metrics.sent_bytes)
        send_errors.add_metric([name], metrics.send_errors)
        calls.add_metric([name], metrics.calls)
        call_errors.add_metric([name], metrics.call_errors)
        call_rejections.add_metric([name], metrics.call_rejections)
        dropped.add_metric([name], metrics.events_dropped)
        _observe(send_seconds, [name], metrics.send_seconds)
        for component, histogram in metrics.recovery_seconds.items():
            _observe(recovery_seconds, [name, component], histogram)
        for component, histogram in metrics.health_check_seconds.items():
            _observe(check_seconds, [name, component], histogram)

    yield from (
        build,
        health_checks,
        component_checks,
        up,
        suspicion,
        status,
        attempts,
        recoveries,
        downtime,
        breaker,
        transitions,
        rejections,
        storage,
        storage_errors,
        sends,
        sent_bytes,
        send_errors,
        calls,
        call_errors,
        call_rejections,
        dropped,
        send_seconds,
        recovery_seconds,
        check_seconds,
    )


def _cluster_metric_families() -> tuple[GaugeMetricFamily, ...]:
    """The cluster families, empty: ``describe()`` lists them, ``collect()`` fills them."""
    labels = ["manager", "node"]
    up = GaugeMetricFamily(
        "dwcp_cluster_node_up", "Whether the cluster node was heard from within its bound.",
        labels=labels,
    )  # fmt: skip
    healthy = GaugeMetricFamily(
        "dwcp_cluster_node_healthy", "Whether the node's last snapshot was healthy.",
        labels=labels,
    )  # fmt: skip
    age = GaugeMetricFamily(
        "dwcp_cluster_node_heartbeat_age_seconds", "Age of the node's last heartbeat.",
        labels=labels,
    )  # fmt: skip
    stale = GaugeMetricFamily(
        "dwcp_cluster_view_stale",
        "1 while the cluster view is stale (Redis unreachable).",
        labels=["manager"],
    )
    skipped = GaugeMetricFamily(
        "dwcp_cluster_records_skipped",
        "Cluster records the last read could not use (not JSON, another version, bad field).",
        labels=["manager"],
    )
    return up, healthy, age, stale, skipped


def _cluster_families(managers: list[tuple[str, HealthSource]]) -> Iterator[Metric]:
    # Only managers with a cluster; each view is the last one read, so no I/O here.
    views = []
    for label, manager in managers:
        read = getattr(manager, "cluster_health", None)  # stand-ins may not have one
        if read is None:
            continue
        try:
            views.append((label, read()))
        except DWCPError:
            continue
    if not views:
        return
    up, healthy, age, stale, skipped = _cluster_metric_families()
    for label, view in views:
        for node in view.nodes.values():
            up.add_metric([label, node.node], 1.0 if node.alive else 0.0)
            healthy.add_metric([label, node.node], 1.0 if node.healthy else 0.0)
            age.add_metric([label, node.node], node.age)
        stale.add_metric([label], 1.0 if view.stale else 0.0)
        skipped.add_metric([label], float(view.skipped))
    yield from (up, healthy, age, stale, skipped)
