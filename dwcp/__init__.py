"""dwcp: keeps a blocking application's network link alive."""

from loguru import logger as _logger

from dwcp.components import Layer, Transport
from dwcp.errors import CircuitOpenError, DWCPError, TransportError

# A library must stay silent until the application asks for its logs.
_logger.disable("dwcp")

__all__ = [
    "CircuitOpenError",
    "DWCPError",
    "Layer",
    "Transport",
    "TransportError",
]
