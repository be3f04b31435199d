"""A peer that is down for a while on a fake clock, and one outage run through a Manager."""

from __future__ import annotations

import math
import threading
import time

import dwcp
from dwcp.testing import FakeClock

__all__ = ["OutagePeer", "run_outage"]


class OutagePeer:
    """A transport down between ``down_at`` and ``up_at`` on a fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.down_at = math.inf
        self.up_at = math.inf

    def _down(self) -> bool:
        return self.down_at <= self.clock.now() < self.up_at

    def start(self) -> None:
        if self._down():
            raise ConnectionRefusedError("peer is down")

    def close(self) -> None:
        pass

    def send(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def health_check(self) -> None:
        if self._down():
            raise ConnectionRefusedError("peer is down")


def run_outage(
    manager: dwcp.Manager,
    clock: FakeClock,
    peer: OutagePeer,
    down_for: float,
    woken: threading.Event | None = None,
) -> list[float]:
    """One outage of ``down_for`` seconds, 100 s after the last; the waits of its recovery.

    ``woken``, set by a listener of the manager's events, ends a poll early.
    """
    woken = woken or threading.Event()
    clock.advance(100.0)
    peer.down_at, peer.up_at = clock.now(), clock.now() + down_for
    first = len(clock.slept)
    manager.check_component_health()
    deadline = time.monotonic() + 10
    while manager.health().components["transport"].status == "recovering":
        assert time.monotonic() < deadline, "recovery cycle did not end"
        woken.wait(0.05)
        woken.clear()
    assert manager.health().components["transport"].status == "healthy"
    return clock.slept[first:]
