"""What every dwcp class that starts shares: ``with`` (enter starts, exit stops) and, for a
class whose start and stop release its lock, the phases that keep them from overlapping."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from dwcp._errors import DWCPError

if TYPE_CHECKING:  # typing.Self is 3.11+ and setup.cfg still allows 3.10
    from typing_extensions import Self

__all__ = ["Phases", "StartStop"]


class StartStop:
    """Mixin: ``with thing:`` calls ``thing.start()``, then ``thing.stop()`` however the block
    ends (an exception in it propagates).  The class defines ``start()`` and ``stop()``."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        """Start (see ``start()``) and return this object."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop (see ``stop()``)."""
        self.stop()


Phase = Literal["stopped", "starting", "running", "stopping"]


class Phases:
    """One lifecycle at a time: ``stopped -> starting -> running -> stopping -> stopped``.

    Kept under its owner's lock (every method is called with it held). ``start()`` and
    ``stop()`` each own the phase they entered until they leave it, so a ``stop()`` racing a
    ``start()`` waits for it and then stops, and neither overwrites the other's state: the
    waits release the lock, and whoever waited re-reads the phase."""

    def __init__(self, lock: threading.Lock | threading.RLock) -> None:
        self.now: Phase = "stopped"
        self._changed = threading.Condition(lock)
        #: Threads the running stop() joins: one of them calling stop() must not wait for it.
        self.joined_by_stop: list[threading.Thread] = []

    def begin_start(self, what: str) -> None:
        """Wait out a ``stop()`` in progress, then enter ``starting``; DWCPError
        ``ALREADY_STARTED`` (naming ``what``) when starting or running."""
        while self.now == "stopping":
            self._changed.wait()
        if self.now != "stopped":
            raise DWCPError(f"{what} is already started", code="ALREADY_STARTED")
        self.now = "starting"

    def begin_stop(self, joining: list[threading.Thread]) -> bool:
        """Wait out a ``start()`` (and a ``stop()``, unless the calling thread is one that
        stop joins), then enter ``stopping`` and return True; False when there is nothing to
        stop. ``joining``: the threads this stop will join."""
        current = threading.current_thread()
        while self.now == "starting" or (
            self.now == "stopping" and current not in self.joined_by_stop
        ):
            self._changed.wait()
        if self.now != "running":
            return False
        self.now = "stopping"
        self.joined_by_stop = list(joining)
        return True

    def enter(self, phase: Literal["stopped", "running"]) -> None:
        """Leave ``starting`` or ``stopping`` for ``phase`` and wake whoever waits."""
        self.now = phase
        if phase == "stopped":
            self.joined_by_stop = []
        self._changed.notify_all()
