"""dwcp: keeps a blocking application's network link alive.

A ``Manager`` monitors a transport and optional protocol layers on a background thread,
recovers what breaks with exponential backoff, and guards every send with a circuit breaker.
"""

from dwcp._logging import forward_to_logging, silence_unless_configured
from dwcp._version import __version__ as __version__
from dwcp.components import Layer, Transport
from dwcp.errors import CircuitOpenError, DWCPError, TransportError
from dwcp.events import (
    BreakerStateChanged,
    ComponentEscalated,
    ComponentUnhealthy,
    Event,
    NodeBack,
    NodeLost,
    RecoveryAttempt,
    RecoveryFailed,
    RecoveryStarted,
    RecoverySucceeded,
    SendRejected,
)
from dwcp.health import ComponentHealth, ComponentMetrics, HealthSnapshot, MetricsSnapshot
from dwcp.http import HealthServer
from dwcp.manager import Manager
from dwcp.recovery import RecoveryPolicy
from dwcp.transport import MultiStreamReceiver, MultiStreamTCPTransport
from dwcp.webhook import WebhookNotifier

# A library stays silent until the application asks for its logs: logger.enable("dwcp"),
# before or after this import, or forward_to_logging().
silence_unless_configured()
del silence_unless_configured

__all__ = [
    "BreakerStateChanged",
    "CircuitOpenError",
    "ComponentEscalated",
    "ComponentHealth",
    "ComponentMetrics",
    "ComponentUnhealthy",
    "DWCPError",
    "Event",
    "HealthServer",
    "HealthSnapshot",
    "Layer",
    "Manager",
    "MetricsSnapshot",
    "MultiStreamReceiver",
    "MultiStreamTCPTransport",
    "NodeBack",
    "NodeLost",
    "RecoveryAttempt",
    "RecoveryFailed",
    "RecoveryPolicy",
    "RecoveryStarted",
    "RecoverySucceeded",
    "SendRejected",
    "Transport",
    "TransportError",
    "WebhookNotifier",
    "forward_to_logging",
]
