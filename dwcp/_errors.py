"""The library's exception hierarchy; foreign errors are mapped to these at the boundary."""

from __future__ import annotations

__all__ = ["CircuitOpenError", "DWCPError", "TransportError"]


class DWCPError(Exception):
    """Base class of every error the library raises on purpose, with a stable ``code``."""

    code: str = "DWCP_ERROR"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"[{self.code}] {super().__str__()}"


class CircuitOpenError(DWCPError):
    """A send was rejected without touching the transport because the breaker is open."""

    code = "CIRCUIT_OPEN"


class TransportError(DWCPError):
    """The transport failed to move bytes: connection refused, reset, timed out, or closed."""

    code = "TRANSPORT_ERROR"
