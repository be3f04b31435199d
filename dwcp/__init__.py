"""dwcp: keeps a blocking application's network link alive.

A ``Manager`` monitors a transport and optional protocol layers on a background thread,
recovers what breaks with exponential backoff, and guards every send with a circuit breaker.
"""

from dwcp._components import Layer, Transport
from dwcp._delivery import Delivery, DeliveryError
from dwcp._errors import CircuitOpenError, DWCPError, TransportError
from dwcp._events import (
    BreakerStateChanged,
    ComponentEscalated,
    ComponentSuspected,
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
from dwcp._health import ComponentHealth, ComponentMetrics, HealthSnapshot, MetricsSnapshot
from dwcp._logging import forward_to_logging, silence_unless_configured
from dwcp._manager import Manager
from dwcp._recovery import RecoveryPolicy
from dwcp._version import __version__ as __version__
from dwcp.http import HealthServer
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
    "ComponentSuspected",
    "ComponentUnhealthy",
    "DWCPError",
    "Delivery",
    "DeliveryError",
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
