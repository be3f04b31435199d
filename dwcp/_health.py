"""Immutable snapshots of what the manager knows: component health and counters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "ComponentHealth",
    "ComponentMetrics",
    "ComponentStatus",
    "HealthSnapshot",
    "LatencyHistogram",
    "MetricsSnapshot",
    "component_documents",
]

ComponentStatus = Literal["healthy", "unhealthy", "recovering", "failed"]


@dataclass(frozen=True)
class ComponentHealth:
    """One component's status, its last error and how long it has been in that status."""

    name: str
    status: ComponentStatus
    last_error: str | None
    seconds_in_status: float
    #: The phi accrual suspicion level: 0 while checks arrive as usual, rising as they (or,
    #: for the transport, sends) become late or slow; see ``RecoveryPolicy``.
    suspicion: float = 0.0

    @property
    def healthy(self) -> bool:
        """Whether the component's last check passed."""
        return self.status == "healthy"


def component_documents(components: Mapping[str, ComponentHealth]) -> dict[str, Any]:
    """The JSON-ready form of each component's health, as ``/health`` and a node's published
    cluster record both carry it: times and suspicion rounded to milliseconds."""
    return {
        name: {
            "status": c.status,
            "last_error": c.last_error,
            "seconds_in_status": round(c.seconds_in_status, 3),
            "suspicion": round(c.suspicion, 3),
        }
        for name, c in components.items()
    }


@dataclass(frozen=True)
class HealthSnapshot:
    """Every component's health plus the breaker state, taken at one moment."""

    components: Mapping[str, ComponentHealth]
    breaker_state: str
    #: Where the breaker state lives: "local", "shared" (Redis), or "fallback" (Redis
    #: unreachable, local state in use until it answers again).
    breaker_storage: str = "local"

    @property
    def healthy(self) -> bool:
        """All components healthy and the breaker not open."""
        return self.breaker_state != "open" and all(c.healthy for c in self.components.values())


@dataclass(frozen=True)
class ComponentMetrics:
    """One component's recovery counters, downtime and current status."""

    status: ComponentStatus
    checks: int
    check_failures: int
    recovery_attempts: int
    recoveries_succeeded: int
    recoveries_failed: int
    downtime_seconds: float


@dataclass(frozen=True)
class LatencyHistogram:
    """Durations observed so far, in seconds, counted into buckets as Prometheus does."""

    #: Upper bounds of the buckets in seconds, ascending; a last ``+Inf`` bucket is implied.
    bounds: tuple[float, ...] = ()
    #: Observations at or below each bound (cumulative), one per bound.
    cumulative_counts: tuple[int, ...] = ()
    #: Every observation, the ``+Inf`` bucket included.
    count: int = 0
    #: Sum of the observed seconds.
    sum: float = 0.0


@dataclass(frozen=True)
class MetricsSnapshot:
    """Counters since construction; downtime is seconds from first failed check to recovery."""

    health_checks: int
    component_checks: int
    recovery_attempts: int
    recoveries_succeeded: int
    recoveries_failed: int
    breaker_state_changes: int
    breaker_rejections: int
    sends: int
    sent_bytes: int
    send_errors: int
    downtime_seconds: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    component_status: Mapping[str, ComponentStatus] = field(
        default_factory=lambda: MappingProxyType({})
    )
    breaker_storage: str = "local"
    breaker_storage_errors: int = 0
    #: Breaker transitions by (from, to) state.
    breaker_transitions: Mapping[tuple[str, str], int] = field(
        default_factory=lambda: MappingProxyType({})
    )
    components: Mapping[str, ComponentMetrics] = field(default_factory=lambda: MappingProxyType({}))
    events_dropped: int = 0
    #: Guarded calls (``call()``, ``@guard``) that returned.
    calls: int = 0
    #: Guarded calls whose exception counted against the breaker (``call_failures``).
    call_errors: int = 0
    #: Guarded calls the breaker rejected (also counted in ``breaker_rejections``).
    call_rejections: int = 0
    #: How long transport sends took, from the call to its return or error.
    send_seconds: LatencyHistogram = field(default_factory=LatencyHistogram)
    #: How long recovery cycles took, from start to success or failure, per component.
    recovery_seconds: Mapping[str, LatencyHistogram] = field(
        default_factory=lambda: MappingProxyType({})
    )
    #: How long health checks took (a timed-out one counts its timeout), per component.
    health_check_seconds: Mapping[str, LatencyHistogram] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @property
    def recovery_success_rate(self) -> float | None:
        """Succeeded recovery cycles over finished ones, or None before the first one ends."""
        done = self.recoveries_succeeded + self.recoveries_failed
        return self.recoveries_succeeded / done if done else None


def _manager_name(manager: object) -> str:
    """A manager's name for labels and documents: its ``name`` (the breaker name), or "dwcp"."""
    for attribute in ("name", "breaker_name"):
        value = getattr(manager, attribute, None)
        if isinstance(value, str) and value:
            return value
    return "dwcp"
