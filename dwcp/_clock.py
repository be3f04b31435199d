"""Time as the manager sees it: a monotonic clock and an interruptible sleep, both injectable."""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """Where the manager reads the time and waits out recovery backoffs.

    The monitor's interval always runs on ``threading.Event.wait``; a test drives passes with
    ``Manager.check_component_health()`` instead.
    """

    def now(self) -> float:
        """Monotonic seconds."""

    def sleep(self, seconds: float, interrupt: threading.Event) -> bool:
        """Wait ``seconds``; return False, early, once ``interrupt`` is set."""


class SystemClock:
    """The real clock: ``time.monotonic`` and ``Event.wait``."""

    def now(self) -> float:
        """Monotonic seconds."""
        return time.monotonic()

    def sleep(self, seconds: float, interrupt: threading.Event) -> bool:
        """Wait ``seconds`` unless ``interrupt`` is set first."""
        return not interrupt.wait(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"
