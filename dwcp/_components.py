"""The structural protocols a transport and a layer satisfy; anything with these methods plugs in."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Layer", "Transport"]


@runtime_checkable
class Transport(Protocol):
    """Moves bytes to a peer; must be safe to ``send`` from many threads and restartable after ``close``."""

    def start(self) -> None:
        """Connect; called again after ``close()`` when recovery restarts the transport."""

    def close(self) -> None:
        """Release every connection; idempotent."""

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as one message, in order, or raise; never a silent partial send.

        A transport may queue the message and return; a failure after that must show in
        ``health_check()`` and make later sends raise.
        """

    def health_check(self) -> None:
        """Return when healthy; raise (any exception) with the reason when not."""


@runtime_checkable
class Layer(Protocol):
    """A protocol layer (compression, prediction, sync, consensus) the manager supervises."""

    def start(self) -> None:
        """Start the layer; called again after ``stop()`` when recovery restarts it."""

    def stop(self) -> None:
        """Stop the layer; idempotent."""

    def is_healthy(self) -> bool:
        """Return whether the layer works right now."""
