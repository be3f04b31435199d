"""What the health server and the Prometheus collector read from a manager, as a protocol.

``HealthServer`` and ``DWCPCollector`` are typed against this, not against ``Manager``, so
neither module depends on the manager and any object with these members can be served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dwcp._cluster import ClusterView
    from dwcp._health import HealthSnapshot, MetricsSnapshot

__all__ = ["HealthSource"]


class HealthSource(Protocol):
    """A source of health and metrics snapshots: ``dwcp.Manager`` is one."""

    @property
    def name(self) -> str:
        """The name metrics and documents are labelled with."""

    @property
    def is_started(self) -> bool:
        """Whether the source is running."""

    @property
    def monitor_alive(self) -> bool:
        """Whether its monitoring thread is alive (``/livez``)."""

    def health(self) -> HealthSnapshot:
        """Component statuses and the breaker state."""

    def metrics(self) -> MetricsSnapshot:
        """Counters, downtime and latency histograms."""

    def cluster_health(self) -> ClusterView:
        """The cluster view; raises ``DWCPError`` (``NO_CLUSTER``) without a cluster."""
