"""Component slots: one interface over a transport and a layer, and the exception boundary.

A transport is started, closed, probed with ``health_check()`` and sent through; a layer is
started, stopped and asked ``is_healthy()``.  The manager sees only ``Slot``; foreign
exceptions from component calls are mapped to the library's hierarchy here.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from loguru import logger

from dwcp._errors import DWCPError, TransportError
from dwcp._recovery import RecoveryPolicy
from dwcp._validation import describe, require_methods

__all__ = [
    "PEER_FAILURES",
    "LayerSlot",
    "Slot",
    "TransportSlot",
    "build_slots",
    "policies",
    "start_slots",
]

LAYER_SLOTS = ("compression", "prediction", "sync", "consensus")
TRANSPORT_METHODS = ("start", "close", "send", "health_check")
LAYER_METHODS = ("start", "stop", "is_healthy")
# What counts against the breaker: the peer or the network failed.  Caller errors
# (TypeError, ValueError), interrupts and our own "not started" never do.
PEER_FAILURES: tuple[type[BaseException], ...] = (OSError, TransportError)


class Slot:
    """One supervised component under its name."""

    is_transport = False

    def __init__(self, name: str, obj: Any) -> None:
        self.name = name
        self.obj = obj
        # The fence: shutdown() closes the slot; a recovery whose start() ends after that
        # (it outlived stop()'s join deadline) undoes its own start, so nothing the
        # manager closed runs on after stop() returned.  Held only to read and flip the
        # flag, never across a component call.
        self._fence = threading.Lock()
        self._closed = True

    @property
    def closed(self) -> bool:
        """Whether ``shutdown()`` closed the slot since its last ``start()``."""
        return self._closed

    def start(self) -> None:
        """Start the component; raises ``TransportError`` or ``DWCPError(START_FAILED)``."""
        with self._fence:
            self._closed = False
        try:
            self.obj.start()
        except DWCPError:
            raise
        except OSError as exc:
            raise TransportError(f"{self.name} failed to start: {describe(exc)}") from exc
        except Exception as exc:
            raise DWCPError(
                f"{self.name} failed to start: {describe(exc)}", code="START_FAILED"
            ) from exc

    def halt(self) -> None:
        """Stop (a layer) or close (a transport), letting errors through."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop the component for good; a failure is logged, never raised.

        A recovery still inside ``restart()`` sees the slot closed when its start returns
        and stops the component again itself.
        """
        with self._fence:
            self._closed = True
        self._halt_quietly()

    def _halt_quietly(self) -> None:
        try:
            self.halt()
        except Exception as exc:  # noqa: BLE001 - shutdown goes on through every component
            logger.bind(component=self.name, error=describe(exc)).warning(
                "Component failed to stop cleanly: {}: {}", self.name, describe(exc)
            )

    def restart(self) -> None:
        """One recovery action: stop, then start again; the start's error is the attempt's.

        Raises ``DWCPError`` (``NOT_STARTED``) when the slot was closed before the action
        began or while it ran; in the second case the late start is undone first.
        """
        self._fenced(self._restart)

    def _restart(self) -> None:
        self.halt()
        self.obj.start()

    def _fenced(self, action: Any) -> None:
        with self._fence:
            if self._closed:
                raise DWCPError(f"{self.name} was stopped by the manager", code="NOT_STARTED")
        action()
        with self._fence:
            late = self._closed
        if late:
            # stop() closed the slot while this start ran: what it started must not outlive it.
            self._halt_quietly()
            raise DWCPError(f"{self.name} was stopped by the manager", code="NOT_STARTED")

    def check(self) -> str | None:
        """Run the health check: None when healthy, else why not."""
        raise NotImplementedError


class TransportSlot(Slot):
    """The transport: ``close()``/``start()``, ``health_check()`` raising when unhealthy."""

    is_transport = True

    def __init__(self, obj: Any) -> None:
        require_methods("transport", obj, TRANSPORT_METHODS)
        super().__init__("transport", obj)

    def halt(self) -> None:
        self.obj.close()

    def _restart(self) -> None:
        try:
            self.obj.close()
        except Exception as exc:  # noqa: BLE001
            # A transport that fails to close may still start; the start decides.
            logger.bind(component=self.name, error=describe(exc)).debug(
                "Transport close failed during recovery"
            )
        self.obj.start()

    def check(self) -> str | None:
        try:
            self.obj.health_check()
        except BaseException as exc:  # noqa: BLE001 - any failure of a check means unhealthy
            return describe(exc)
        return None


class LayerSlot(Slot):
    """A protocol layer: ``stop()``/``start()``, ``is_healthy()`` returning a bool."""

    def __init__(self, name: str, obj: Any, *, label: str) -> None:
        require_methods(label, obj, LAYER_METHODS)
        super().__init__(name, obj)

    def halt(self) -> None:
        self.obj.stop()

    def check(self) -> str | None:
        try:
            healthy = self.obj.is_healthy()
        except BaseException as exc:  # noqa: BLE001 - any failure of a check means unhealthy
            return describe(exc)
        return None if healthy else "is_healthy() returned False"


def start_slots(slots: Sequence[Slot], fail_fast: bool) -> dict[str, DWCPError]:
    """Start ``slots`` in order and return the error of each that failed to start.

    A failed component is left to recovery (the manager starts degraded), unless
    ``fail_fast``: then its error is raised, after shutting down the ones already started.
    """
    started: list[Slot] = []
    failed: dict[str, DWCPError] = {}
    try:
        for slot in slots:
            try:
                slot.start()
            except DWCPError as exc:
                # A peer that is down at start is what this library recovers from; only
                # fail_fast makes it the caller's problem.
                if fail_fast:
                    raise
                failed[slot.name] = exc
                continue
            started.append(slot)
    except BaseException:
        for slot in reversed(started):
            slot.shutdown()
        raise
    return failed


def build_slots(
    transport: object, layers: tuple[object, ...], named: Mapping[str, object] | None
) -> list[Slot]:
    """One slot per configured component, in check and recovery order."""
    slots: list[Slot] = [] if transport is None else [TransportSlot(transport)]
    for slot, layer in zip(LAYER_SLOTS, layers):
        if layer is not None:
            slots.append(LayerSlot(slot, layer, label=slot))
    if named is not None and not isinstance(named, Mapping):
        raise TypeError(f"layers must be a mapping of name to layer, got {type(named).__name__}")
    for name, layer in (named or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"layers keys must be non-empty strings, got {name!r}")
        if name in ("transport", *LAYER_SLOTS) or any(s.name == name for s in slots):
            raise ValueError(f"layers name {name!r} clashes with a built-in component slot")
        slots.append(LayerSlot(name, layer, label=f"layer {name!r}"))
    return slots


def policies(
    recovery: Mapping[str, RecoveryPolicy] | None, slots: list[Slot], default: RecoveryPolicy
) -> dict[str, RecoveryPolicy]:
    if recovery is not None and not isinstance(recovery, Mapping):
        raise TypeError("recovery must be a mapping of component name to RecoveryPolicy")
    names = [s.name for s in slots]
    for name, policy in (recovery or {}).items():
        if name not in names:
            known = ", ".join(names) or "none"
            raise ValueError(f"recovery names unknown component {name!r} (configured: {known})")
        if not isinstance(policy, RecoveryPolicy):
            raise TypeError(
                f"recovery[{name!r}] must be a RecoveryPolicy, got {type(policy).__name__}"
            )
    return {name: (recovery or {}).get(name, default) for name in names}
